"""Bad inputs through the `lorafit` command: each exits with 2, prints exactly one line `error: ...` on stderr
that names the problem, and writes nothing (no out folder, no file).

The rows run in-process through `lorafit.cli.main` (a process start-up per row would make the table slow); a few
rows patch the file system to be read-only, full or forbidden, since root ignores chmod. `test_cli.py` runs the
real command for the traceback switches (--debug, LORAFIT_DEBUG).
"""

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import lorafit
from lorafit import cli
from tests.conftest import TINY_WORDS, saved_tiny_model

GOOD_ROWS = [{"instruction": f"{a} {b}", "input": "", "output": b} for a in TINY_WORDS for b in TINY_WORDS]


@dataclass
class Workspace:
    """What the rows share, never written to: a tiny model folder, good data, an adapter trained on nothing."""

    model: Path
    train: Path
    adapter: Path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("shared")
    model = saved_tiny_model(root / "model")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in GOOD_ROWS))
    net = AutoModelForCausalLM.from_pretrained(model)
    lorafit.inject(net, lorafit.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    lorafit.save_adapter(net, root / "adapter")
    return Workspace(model, train, root / "adapter")


def config(ws: Workspace, tmp: Path, extra: str = "") -> str:
    """A good one-step run config in `tmp` (plus `extra` YAML), writing to tmp/run."""
    path = tmp / "run.yaml"
    path.write_text(f"model:\n  name: {ws.model}\ndata:\n  train: {ws.train}\n  val_fraction: 0.25\nlora:\n"
                    f"  targets: all-linear\ntrain:\n  steps: 1\n  batch_size: 2\nout: {tmp / 'run'}\n{extra}")
    return str(path)


def train_on(name: str, text: str | bytes, *more: str) -> Callable[[Workspace, Path], list[str]]:
    """Argv of `lorafit train` on a data file `name` holding `text` (written into the row's own folder)."""
    def make(ws: Workspace, tmp: Path) -> list[str]:
        path = tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", config(ws, tmp), "--data.train", str(path), *more]
    return make


def train_with(*flags: str, extra: str = "") -> Callable[[Workspace, Path], list[str]]:
    """Argv of `lorafit train` on the good config plus `flags` (and `extra` YAML in the file)."""
    return lambda ws, tmp: ["train", config(ws, tmp, extra), *flags]


def adapter_with(change: Callable[[Path], None]) -> Callable[[Workspace, Path], Path]:
    """A copy of the good adapter in the row's folder, spoiled by `change(folder)`."""
    def make(ws: Workspace, tmp: Path) -> Path:
        folder = tmp / "adapter"
        folder.mkdir()
        for file in ws.adapter.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        change(folder)
        return folder
    return make


def edit_json(**changes) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return change


def wrong_shapes(folder: Path) -> None:
    """Claim r=4 in the config while the tensors have r=2."""
    edit_json(r=4)(folder)


def inspect(spoil: Callable[[Path], None]):
    return lambda ws, tmp: ["inspect", str(adapter_with(spoil)(ws, tmp))]


def generate_with(spoil: Callable[[Path], None], *flags: str):
    return lambda ws, tmp: ["generate", "--model", str(ws.model), "--adapter", str(adapter_with(spoil)(ws, tmp)),
                            *flags, "hello"]


def a_file(tmp: Path) -> Path:
    (tmp / "a_file").write_text("in the way")
    return tmp / "a_file"


def no_weights(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()


def truncated_weights(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def read_only(monkeypatch) -> None:
    """Every file system read-only, as a `mount -o ro` would be (root ignores chmod)."""
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_RDONLY))


def no_permission(monkeypatch) -> None:
    """No folder may be written, as for a user without the rights (root ignores chmod)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not mode & os.W_OK and real(path, mode, **kw))


def full_disk(monkeypatch) -> None:
    """save_pretrained fails as safetensors does on a full disk: SafetensorError wrapping os error 28."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)


@dataclass
class Bad:
    id: str
    make: Callable[[Workspace, Path], list[str]]  # argv, after writing the row's bad inputs into its folder
    phrase: str  # what the one line must say
    patch: Callable | None = None  # monkeypatch the file system (read-only, full, forbidden)


BAD = [
    # --- data files ---
    Bad("bad-json-line", train_on("t.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n'),
        "t.jsonl line 2: not valid JSON"),
    Bad("bad-row-hint-speaks-cli", train_on("t.jsonl", '{"instruction": "a", "output": "b"}\n[1]\n'),
        "skip bad rows with --data.skip_bad_rows true"),
    Bad("missing-field", train_on("t.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n'),
        "line 2: missing field 'output'"),
    Bad("empty-file", train_on("t.jsonl", ""), "no data to use (the file holds no rows)"),
    Bad("blank-lines-only", train_on("t.jsonl", "\n\n  \n"), "no data to use"),
    Bad("wrong-file-type", train_on("t.txt", "hello\n"), "unsupported file type"),
    Bad("csv-without-header", train_on("t.csv", "hello,world\ncat,dog\n"), "cannot tell the format from fields"),
    Bad("csv-too-many-values", train_on("t.csv", "instruction,output\na,b,c\n"), "3 values but the header has 2"),
    Bad("not-utf8", train_on("t.jsonl", b'{"instruction": "\xff", "output": "b"}\n'), "line 1: not UTF-8 text"),
    Bad("not-an-object", train_on("t.jsonl", '["instruction", "output"]\n'), "expected a JSON object, got list"),
    Bad("field-not-a-string", train_on("t.jsonl", '{"instruction": "a", "output": 3}\n'),
        "field 'output' must be a string"),
    Bad("empty-field", train_on("t.jsonl", '{"instruction": "a", "output": "  "}\n'), "field 'output' is empty"),
    Bad("unknown-fields", train_on("t.jsonl", '{"question": "a", "answer": "b"}\n'), "cannot tell the format"),
    Bad("chat-without-assistant", train_on("t.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n'),
        "messages has no 'assistant' turn"),
    Bad("chat-messages-not-a-list", train_on("t.jsonl", '{"messages": "hi"}\n'), "must be a non-empty list"),
    Bad("train-file-missing", lambda ws, tmp: ["train", config(ws, tmp), "--data.train", str(tmp / "no.jsonl")],
        "no.jsonl: file not found"),
    Bad("validation-file-missing", train_with("--data.validation", "nowhere.jsonl"), "nowhere.jsonl: file not found"),
    Bad("all-rows-bad-skipped", train_on("t.jsonl", "{\n{\n", "--data.skip_bad_rows", "true"), "all 2 rows are bad"),
    Bad("too-few-rows-to-hold-out", train_on("t.jsonl", '{"instruction": "a", "output": "b"}\n'),
        "too few to hold out val_fraction"),
    Bad("corrupt-parquet", train_on("t.parquet", b"PAR1 not really"), "not a readable Parquet file"),
    Bad("unknown-validation-label", lambda ws, tmp: [
        *train_on("t.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')(ws, tmp),
        "--data.validation", str(_write(tmp / "v.jsonl", '{"text": "c", "label": "z"}\n')),
        "--model.task", "classification"], "validation label 'z' never occurs in the training data"),
    Bad("packing-classification", train_with("--model.task", "classification", "--data.packing", "true"),
        "--data.packing: applies to causal LM formats, not classification"),
    Bad("bad-val-fraction", train_with("--data.val_fraction", "1.5"), "--data.val_fraction: must be in [0, 1)"),
    # --- config ---
    Bad("unknown-key-in-file", train_with(extra="eval:\n  limt: 3\n"), "run.yaml: eval.limt: unknown key; did you mean "
        "eval.limit?"),
    Bad("unknown-key-flag", train_with("--lora.rank", "8"), "--lora.rank: unknown key; did you mean --lora.r?"),
    Bad("unknown-key-flag-no-match", train_with("--lora.zzz", "8"), "--lora.zzz: unknown key; lora takes r, alpha"),
    Bad("unknown-section-flag", train_with("--lroa.r", "8"), "--lroa.r: unknown section; did you mean --lora.r?"),
    Bad("unknown-section-in-file", train_with(extra="trian:\n  steps: 3\n"), "trian: unknown section; did you mean "
        "train?"),
    Bad("wrong-type", train_with("--train.steps", "many"), "--train.steps: Input should be a valid integer"),
    Bad("wrong-type-in-file", train_with(extra="eval:\n  batch_size: big\n"), "run.yaml: eval.batch_size: Input "
        "should be a valid integer"),
    Bad("zero-rank", train_with("--lora.r", "0"), "--lora.r: must be a positive integer"),
    Bad("bad-regex", train_with("--lora.targets", "q_proj("), "--lora.targets: 'q_proj(' is not a valid regular "
        "expression"),
    Bad("bad-yaml", lambda ws, tmp: ["train", str(_write(tmp / "run.yaml", "data:\n  train: [a\nlora: 1\n"))],
        "run.yaml: not valid YAML at line 3, column 5"),
    Bad("yaml-not-a-mapping", lambda ws, tmp: ["train", str(_write(tmp / "run.yaml", "- a\n- b\n"))],
        "expected a mapping of sections"),
    Bad("config-missing", lambda ws, tmp: ["train", str(tmp / "nope.yaml")], "nope.yaml: config file not found"),
    Bad("data-train-missing", lambda ws, tmp: ["train", str(_write(tmp / "run.yaml", "lora:\n  r: 4\n"))],
        "run.yaml: data.train: required key is missing"),
    Bad("eval-limit-zero", train_with("--eval.limit", "0"), "--eval.limit: must be >= 1, or null"),
    Bad("eval-max-new-tokens-zero", train_with("--eval.max_new_tokens", "0"), "--eval.max_new_tokens: must be >= 1"),
    Bad("bad-device", train_with("--train.device", "tpu"), "--train.device: must be auto, cpu, cuda or cuda:N"),
    Bad("bad-precision", train_with("--precision", "bf17"), "--train.precision: must be one of"),
    Bad("bad-quantize", train_with("--quantize", "nf5"), "--model.quantize: must be one of"),
    Bad("unknown-method", train_with("--method", "lorra"), "--method.name: must be one of lora, full"),
    Bad("quantized-full-fine-tuning", train_with("--quantize", "nf4", "--method", "full"),
        "--model.quantize: nf4 freezes the base in quantized form"),
    Bad("zero-lr", train_with("--train.lr", "0"), "need lr > 0"),
    Bad("override-without-value", train_with("--train.steps"), "override --train.steps has no value"),
    Bad("override-not-a-flag", train_with("steps=3"), "should look like --section.key value"),
    Bad("override-bad-yaml", train_with("--lora.targets", "[q_proj"), "--lora.targets: value '[q_proj' is not valid "
        "YAML"),
    Bad("section-given-a-value", train_with("--lora", "5"), "--lora: is a section, not a value"),
    Bad("value-given-keys", train_with("--out.dir", "x"), "--out.dir: takes a value, not keys under it"),
    Bad("value-and-keys", train_with("--lora", "5", "--lora.r", "3"), "--lora was given a value"),
    Bad("target-typo", train_with("--lora.targets", "[q_prj]"), "lora.targets: ['q_prj'] match no module of "
        "LlamaForCausalLM"),
    Bad("target-layers-out-of-range", train_with("--lora.targets", "[q_proj]", "--lora.layers", "[7]"),
        "in layers [7]"),
    Bad("model-not-found", train_with("--model.name", str(Path("/nowhere/model"))), "model '/nowhere/model' not found"),
    Bad("unknown-preset", lambda ws, tmp: ["generate", "--model", "minilm-l7", "hi"], "did you mean 'minilm-l6'?"),
    # --- adapters ---
    Bad("adapter-folder-missing", lambda ws, tmp: ["inspect", str(tmp / "none")], "none: not found (an adapter folder"),
    Bad("adapter-weights-missing", inspect(no_weights), "adapter_model.safetensors: not found"),
    Bad("adapter-weights-truncated", inspect(truncated_weights), "cannot be read as safetensors"),
    Bad("adapter-config-not-json", inspect(lambda f: _write(f / "adapter_config.json", "{r: 2")), "not valid JSON"),
    Bad("adapter-bdlora", inspect(edit_json(use_bdlora={"nblocks": 2})),
        "use_bdlora={'nblocks': 2} is not supported by lorafit"),
    Bad("adapter-not-lora", inspect(edit_json(peft_type="PREFIX_TUNING")),
        "peft_type must be \"LORA\" (lorafit reads LoRA adapters only), got 'PREFIX_TUNING'"),
    Bad("adapter-wrong-shapes", generate_with(wrong_shapes), "the model needs (4, 64) (adapter for another model?)"),
    Bad("adapter-targets-missing", generate_with(edit_json(target_modules=["nope"])), "['nope'] match no module"),
    Bad("adapter-without-base", lambda ws, tmp: ["merge", "--adapter", str(adapter_with(
        edit_json(base_model_name_or_path=None))(ws, tmp)), "--out", str(tmp / "merged")],
        "no base_model_name_or_path recorded; pass --model"),
    Bad("adapter-path-is-not-a-folder", lambda ws, tmp: ["generate", "--adapter", str(a_file(tmp)), "hi"],
        "adapter_config.json: not found; is"),
    # --- command-line flags and output paths ---
    Bad("negative-temperature", lambda ws, tmp: ["generate", "--model", str(ws.model), "--temperature", "-1", "hi"],
        "Invalid value for '--temperature'"),
    Bad("chat-negative-temperature", lambda ws, tmp: ["chat", "--model", str(ws.model), "--temperature", "-0.5"],
        "Invalid value for '--temperature'"),
    Bad("zero-max-new-tokens", lambda ws, tmp: ["generate", "--model", str(ws.model), "--max-new-tokens", "0", "hi"],
        "Invalid value for '--max-new-tokens'"),
    Bad("budget-past-the-context", lambda ws, tmp: ["generate", "--model", str(ws.model), "--max-new-tokens", "64",
                                                    "hi"], "leaves no room for a prompt in the model's context of 64"),
    Bad("no-model-no-adapter", lambda ws, tmp: ["generate", "hi"], "name a --model or at least one --adapter"),
    Bad("unknown-option", lambda ws, tmp: ["generate", "--temprature", "1", "hi"], "No such option: --temprature"),
    Bad("unknown-command", lambda ws, tmp: ["trian", "x.yaml"], "No such command 'trian'"),
    Bad("train-out-is-a-file", lambda ws, tmp: ["train", config(ws, tmp), "--out", str(a_file(tmp))],
        "a_file: exists and is a file, not a folder"),
    Bad("train-out-under-a-file", lambda ws, tmp: ["train", config(ws, tmp), "--out", str(a_file(tmp) / "run")],
        "a file stands where a folder is needed"),
    Bad("train-out-read-only", train_with(), "run: read-only file system; choose another --out", read_only),
    Bad("train-out-permission-denied", train_with(), "permission denied; choose another --out", no_permission),
    Bad("merge-out-is-a-file", lambda ws, tmp: ["merge", "--adapter", str(ws.adapter), "--out", str(a_file(tmp))],
        "exists and is a file; pass a folder path"),
    Bad("merge-out-under-a-file", lambda ws, tmp: ["merge", "--adapter", str(ws.adapter), "--out",
                                                   str(a_file(tmp) / "m")],
        "a_file is a file): a file stands where a folder is needed"),
    Bad("merge-out-not-empty", lambda ws, tmp: ["merge", "--adapter", str(ws.adapter), "--out", str(_full(tmp))],
        "exists and is not empty; pass --overwrite"),
    Bad("merge-out-read-only", lambda ws, tmp: ["merge", "--adapter", str(ws.adapter), "--out", str(tmp / "m")],
        "read-only file system", read_only),
    Bad("merge-disk-full", lambda ws, tmp: ["merge", "--adapter", str(ws.adapter), "--out", str(tmp / "m")],
        "no space left on device writing", full_disk),
    Bad("plan-out-under-a-file", lambda ws, tmp: ["plan", str(ws.model), "--out", str(a_file(tmp) / "plan")],
        "a file stands where a folder is needed"),
    Bad("analyze-out-is-a-file", lambda ws, tmp: ["analyze", str(ws.adapter), "--no-base", "--out", str(a_file(tmp))],
        "exists and is a file, not a folder"),
    Bad("sweep-out-under-a-file", lambda ws, tmp: ["sweep", config(ws, tmp), "--out", str(a_file(tmp) / "s")],
        "a file stands where a folder is needed"),
    Bad("flip-bad-choice", lambda ws, tmp: ["reproduce", "flip", "--flip", "diagonal", "--out", str(tmp / "f")],
        "flip must be 'lr' or 'ud'"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _full(tmp: Path) -> Path:
    (tmp / "merged").mkdir()
    return _write(tmp / "merged" / "keep.txt", "mine").parent


def tree(*roots: Path) -> dict:
    """Every path under `roots` with its size and modification time: what "nothing was written" compares."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*")}


def run_main(argv: list[str], capfd) -> tuple[int, str, str]:
    """`lorafit ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(bad, ws, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # default out folders (runs/...) would land here, inside the snapshot
    monkeypatch.delenv("LORAFIT_DEBUG", raising=False)
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("lorafit.training.cpu.memory.keep_freed_memory", lambda: None)  # the process's allocator
    monkeypatch.setattr(hf_logging, "_tqdm_active", False)  # "Loading weights": progress, not part of an error
    argv = bad.make(ws, tmp_path)
    before = tree(tmp_path, ws.model.parent)
    if bad.patch:
        bad.patch(monkeypatch)
    code, _, err = run_main(argv, capfd)
    monkeypatch.undo()
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert bad.phrase in lines[0], lines[0]
    assert tree(tmp_path, ws.model.parent) == before, "something was written"


def test_the_table_is_large_enough():
    assert len(BAD) >= 60


def test_a_bug_keeps_its_traceback(ws, monkeypatch, capfd):
    """Only user-caused failures become one line; anything else is a bug and raises as it is."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr("lorafit.core.adapter_io.read_adapter", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["inspect", str(ws.adapter)])


def test_debug_raises_the_user_error_itself(ws, tmp_path, monkeypatch):
    from lorafit.core import AdapterFileError

    monkeypatch.delenv("LORAFIT_DEBUG", raising=False)
    with pytest.raises(AdapterFileError):
        cli.main(["--debug", "inspect", str(tmp_path)])
    monkeypatch.setenv("LORAFIT_DEBUG", "1")
    with pytest.raises(AdapterFileError):
        cli.main(["inspect", str(tmp_path)])


def test_a_prompt_too_long_is_cut_and_says_so_on_stderr(ws, capfd):
    code, out, err = run_main(["generate", "--model", str(ws.model), "--max-new-tokens", "4",
                               " ".join(TINY_WORDS * 20)], capfd)
    assert code == 0, err
    assert "prompt truncated to 60 tokens (the model's context is 64" in err and out.startswith("[base] ")


def test_errno_lines_name_the_path_and_the_fix():
    from lorafit.core.files import describe_os_error

    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/adapter_model.safetensors")
    assert describe_os_error(full) == ("no space left on device writing /data/run/adapter_model.safetensors: free "
                                       "space or choose another --out (output folder)")
    assert describe_os_error(OSError(errno.EIO, "I/O error", "/x")) is None  # not the user's to fix: a traceback
    assert describe_os_error(RuntimeError("no")) is None
