"""The flipped-digits experiment of the first talk: does LoRA recover accuracy lost to a data shift?

An MLP is trained on clean images. Then a fraction of the images of two classes are mirrored ("flipped"); the
base model loses accuracy on them. Four ways to adapt, on the same flipped training set, same seed:
no adaptation (base), LoRA on every Linear layer, full fine-tuning, and training the last layer only.
"""

from __future__ import annotations

import copy
import gzip
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ...core.adapter_io import save_adapter
from ...core.config import LoraConfig
from ...core.files import write_json, write_text
from ...core.surgery import inject

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_FLIP = {"digits": "lr", "fashion-mnist": "ud"}  # clothes are mostly left-right symmetric
# (base epochs, fine-tuning epochs, batch size): 1,257 small digits need many passes, 60,000 clothes few
DEFAULT_SCHEDULE = {"digits": (40, 30, 64), "fashion-mnist": (8, 4, 128)}
METHODS = ("base", "lora", "full", "last_layer")


@dataclass
class FlipConfig:
    """What `lorafit reproduce flip` runs."""

    data: str = "digits"  # "digits" (scikit-learn's bundled 8x8 digits) or "fashion-mnist" (Debian package)
    flip: str | None = None  # "lr" (left-right) or "ud" (up-down); None: the data set's default
    classes: tuple[int, ...] = (2, 3)  # the classes whose images get flipped
    fraction: float = 0.3  # share of those classes' images that are flipped
    rank: int = 4  # LoRA rank on fc1, fc2, fc3
    alpha: float = 8.0  # LoRA scale = alpha / rank
    base_epochs: int | None = None  # training of the base model on clean data (None: the data set's default)
    tune_epochs: int | None = None  # fine-tuning of every method on flipped data (None: the data set's default)
    lr: float = 1e-3  # base training and full / last-layer fine-tuning
    lora_lr: float = 5e-3  # LoRA trains fewer, zero-started parameters: a larger step suits it
    batch_size: int | None = None  # None: the data set's default
    seed: int = 0
    out: Path = field(default_factory=lambda: Path("runs/flip"))
    data_dir: Path = FASHION_DIR  # where the Fashion-MNIST idx files are

    def __post_init__(self) -> None:
        if self.data not in DEFAULT_FLIP:
            raise ValueError(f"data must be one of {list(DEFAULT_FLIP)}, got {self.data!r}")
        self.flip = self.flip or DEFAULT_FLIP[self.data]
        base_epochs, tune_epochs, batch_size = DEFAULT_SCHEDULE[self.data]
        self.base_epochs = self.base_epochs or base_epochs
        self.tune_epochs = self.tune_epochs or tune_epochs
        self.batch_size = self.batch_size or batch_size
        if self.flip not in ("lr", "ud"):
            raise ValueError(f"flip must be 'lr' or 'ud', got {self.flip!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if not all(0 <= c <= 9 for c in self.classes):
            raise ValueError(f"classes must be digits 0..9, got {self.classes}")
        for name in ("rank", "base_epochs", "tune_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.out = Path(self.out)


class MLP(nn.Module):
    """in -> 256 -> 128 -> 10 with ReLU; 235,146 parameters for 28x28 inputs, as in the talk."""

    def __init__(self, inputs: int):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(inputs, 256), nn.Linear(256, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))  # (B, 256)
        return self.fc3(torch.relu(self.fc2(h)))  # (B, 10) logits


def load_images(cfg: FlipConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels); images (N, H, W) float32 in [0, 1]."""
    if cfg.data == "digits":
        from sklearn.datasets import load_digits  # heavy: only the digits data set needs it
        from sklearn.model_selection import train_test_split  # heavy: only the digits data set needs it

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8), pixels 0..16
        x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target, test_size=0.3, random_state=cfg.seed,
                                                  stratify=digits.target)
        return x_tr, y_tr, x_te, y_te
    files = [cfg.data_dir / f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found ({missing[0]}); install it with "
                                "`apt-get install dataset-fashion-mnist`, or use --data digits")
    x_tr, y_tr, x_te, y_te = (_read_idx(f) for f in files)
    return (x_tr / 255.0).astype(np.float32), y_tr, (x_te / 255.0).astype(np.float32), y_te


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, big-endian dimensions, then unsigned bytes."""
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape).astype(np.int64)


def flip_images(images: np.ndarray, labels: np.ndarray, cfg: FlipConfig, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Mirror `cfg.fraction` of the images of `cfg.classes` (picked from the seed); returns (images, flipped mask)."""
    rng = np.random.default_rng([cfg.seed, salt])
    candidates = np.flatnonzero(np.isin(labels, cfg.classes))
    chosen = rng.choice(candidates, size=round(cfg.fraction * len(candidates)), replace=False)
    mask = np.zeros(len(labels), dtype=bool)
    mask[chosen] = True
    out = images.copy()
    out[mask] = out[mask][:, :, ::-1] if cfg.flip == "lr" else out[mask][:, ::-1, :]
    return out, mask


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, cfg: FlipConfig) -> float:
    """Adam on the model's trainable parameters, shuffled minibatches from the seed; returns seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return round(100.0 * (model(x).argmax(-1) == y).float().mean().item(), 2)


def _file_bytes(tensors: dict[str, torch.Tensor], path: Path) -> int:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)
    return path.stat().st_size


def adapt(method: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FlipConfig) -> tuple[nn.Module, dict]:
    """A copy of the base model adapted by `method`; returns it with its trainable count, file bytes, seconds."""
    model = copy.deepcopy(base)
    info: dict = {"seconds": 0.0}
    if method == "lora":
        inject(model, LoraConfig(r=cfg.rank, alpha=cfg.alpha, targets=["fc1", "fc2", "fc3"]))
    elif method == "last_layer":
        model.requires_grad_(False)
        model.fc3.requires_grad_(True)
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method != "base":
        torch.manual_seed(cfg.seed)
        info["seconds"] = round(fit(model, x, y, cfg.tune_epochs, cfg.lora_lr if method == "lora" else cfg.lr, cfg), 2)
    if method == "lora":
        saved = save_adapter(model, cfg.out / "adapter")
        info["checkpoint_bytes"], info["tensor_bytes"] = saved["file_bytes"], saved["tensor_bytes"]
    elif method == "last_layer":
        info["checkpoint_bytes"] = _file_bytes(dict(model.fc3.named_parameters()), cfg.out / "last_layer.safetensors")
    else:
        info["checkpoint_bytes"] = _file_bytes(model.state_dict(), cfg.out / f"{method}.safetensors")
    return model, info


def run(cfg: FlipConfig, log=print) -> dict:
    """Train the base model, flip the data, adapt four ways; write results.json, table.md and flip.png."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load_images(cfg)
    x_tr_flip, _ = flip_images(x_tr, y_tr, cfg, salt=1)
    x_te_flip, _ = flip_images(x_te, y_te, cfg, salt=2)
    t = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in
         [("x_tr", x_tr), ("y_tr", y_tr), ("x_te", x_te), ("y_te", y_te), ("x_tr_flip", x_tr_flip),
          ("x_te_flip", x_te_flip)]}
    t["y_tr"], t["y_te"] = t["y_tr"].long(), t["y_te"].long()
    torch.manual_seed(cfg.seed)
    base = MLP(x_tr[0].size)
    log(f"{cfg.data}: {len(x_tr)} train / {len(x_te)} test images of {x_tr.shape[1]}x{x_tr.shape[2]}; "
        f"{cfg.fraction:.0%} of classes {list(cfg.classes)} flipped {cfg.flip}")
    base_seconds = fit(base, t["x_tr"], t["y_tr"], cfg.base_epochs, cfg.lr, cfg)
    results = {"data": cfg.data, "config": {**asdict(cfg), "out": str(cfg.out), "data_dir": str(cfg.data_dir)},
               "base_params": sum(p.numel() for p in base.parameters()), "base_train_seconds": round(base_seconds, 2),
               "methods": {}}
    for method in METHODS:
        model, info = adapt(method, base, t["x_tr_flip"], t["y_tr"], cfg)
        info.update(clean_acc=accuracy(model, t["x_te"], t["y_te"]),
                    flipped_acc=accuracy(model, t["x_te_flip"], t["y_te"]))
        results["methods"][method] = info
        log(f"{method:>10}: clean {info['clean_acc']:.2f}%  flipped {info['flipped_acc']:.2f}%  "
            f"trainable {info['trainable_params']:,}  {info['seconds']:.1f}s")
    write_json(cfg.out / "results.json", results)
    write_text(cfg.out / "table.md", format_table(results) + "\n")
    plot(results, cfg.out / "flip.png")
    return results


def format_table(results: dict) -> str:
    """The results as a markdown table, one row per method."""
    total = results["base_params"]
    lines = ["| method | clean acc % | flipped acc % | trainable params | checkpoint bytes | seconds |",
             "|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        share = 100 * m["trainable_params"] / total
        lines.append(f"| {name} | {m['clean_acc']:.2f} | {m['flipped_acc']:.2f} | {m['trainable_params']:,} "
                     f"({share:.1f}%) | {m['checkpoint_bytes']:,} | {m['seconds']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, png: Path) -> None:
    """Grouped bars: clean and flipped test accuracy per method, labelled with trainable parameters."""
    import matplotlib  # heavy: imported only to draw the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: imported only to draw the plot

    names = list(results["methods"])
    clean = [results["methods"][n]["clean_acc"] for n in names]
    flipped = [results["methods"][n]["flipped_acc"] for n in names]
    xs = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(xs - 0.2, clean, 0.4, label="clean test")
    ax.bar(xs + 0.2, flipped, 0.4, label="flipped test")
    ax.set_xticks(xs, [f"{n}\n{results['methods'][n]['trainable_params']:,} trainable" for n in names])
    low = min(clean + flipped)
    ax.set_ylim(max(0, low - 5), 100)
    ax.set_ylabel("accuracy %")
    ax.set_title(f"Flipped {results['data']}: adapting to mirrored classes {results['config']['classes']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
