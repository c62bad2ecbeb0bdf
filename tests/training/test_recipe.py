"""The training recipe on a tiny local model: it learns, writes its outputs, and resumes exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lorafit.data import PROMPT_FILE, Example
from lorafit.training.config import load_run_config
from lorafit.training.recipe import train, typical_rows
from tests.conftest import TINY_WORDS, tiny_bert, tiny_job, tiny_run_config, tiny_tokenizer


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tiny_job(tmp_path)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_run_learns_and_writes_adapter_metrics_and_plot(setup, precision):
    tmp_path, model = setup
    cfg = tiny_run_config(tmp_path, model, tmp_path / "run", "--train.steps", "12", "--train.precision", precision)
    report = train(cfg, log=lambda _: None)
    assert report["precision"] == precision
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # train.device auto
    out = tmp_path / "run"
    assert report["tuned"]["loss"] < report["base"]["loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert (out / "before_after.png").is_file()
    assert {t.dtype for t in load_file(out / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13)) and "eval_loss" in rows[-1]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 12 and isinstance(results["halved_products"], str)


def test_resume_from_a_checkpoint_ends_with_the_same_adapter(setup):
    tmp_path, model = setup
    train(tiny_run_config(tmp_path, model, tmp_path / "a"), log=lambda _: None)
    train(tiny_run_config(tmp_path, model, tmp_path / "b"), log=lambda _: None)
    checkpoints = tmp_path / "b" / "checkpoints"  # pretend the run was killed right after step 3
    (checkpoints / "latest.json").write_text(json.dumps({"checkpoint": "step-000003", "step": 3}))
    train(tiny_run_config(tmp_path, model, tmp_path / "b"), resume=True, log=lambda _: None)
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key


def test_resume_without_checkpoint_is_a_clear_error(setup):
    tmp_path, model = setup
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_run_config(tmp_path, model, tmp_path / "c"), resume=True, log=lambda _: None)


def test_classifier_adapter_records_its_labels_and_merges_to_a_plain_classifier(tmp_path, monkeypatch):
    """Trained with a bf16 base (the new head trains in fp32), reloaded and merged in fp32."""
    from transformers import AutoModelForSequenceClassification

    from lorafit.inference.generate import load_with_adapters
    from lorafit.models import save_merged

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_bert().bert.save_pretrained(tmp_path / "encoder")  # an encoder without a head, like minilm-l6
    tiny_tokenizer().save_pretrained(tmp_path / "encoder")
    rows = [{"text": f"{a} {b}", "label": {"cat": "animal", "dog": "animal"}.get(a, "word")}
            for a in TINY_WORDS for b in TINY_WORDS] * 2
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_run_config(None, ["--model.name", str(tmp_path / "encoder"), "--model.task", "classification",
                                 "--data.train", str(tmp_path / "train.jsonl"), "--data.val_fraction", "0.25",
                                 "--lora.targets", "[query, value]", "--train.steps", "3", "--train.precision", "bf16",
                                 "--out", str(tmp_path / "run")])
    train(cfg, log=lambda _: None)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert json.loads((adapter / PROMPT_FILE).read_text())["format"] == "classification"
    tuned = json.loads((tmp_path / "run" / "results.json").read_text())["tuned"]  # value, loss, and now per class
    assert set(tuned["per_class"]) == {"animal", "word"} and len(tuned["confusion"]) == 2
    assert len(tuned["predictions"]) == 8 and set(tuned["predictions"][0]) == {"text", "label", "prediction",
                                                                               "probabilities"}

    net, tokenizer, _ = load_with_adapters(None, [str(adapter)])  # task and labels come from the adapter
    assert net.config.id2label == {0: "animal", 1: "word"}
    batch = tokenizer(["cat hello", "world dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = net(**batch).logits
    save_merged(net, tokenizer, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "animal", 1: "word"}
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected)


def test_the_adapter_records_the_instruction_its_rows_share_and_their_layout(setup):
    """What `generate` needs to lay a user's text out as a training row: saved beside the adapter."""
    tmp_path, model = setup
    rows = [{"instruction": "cat dog", "input": f"{a} {b}", "output": a} for a in TINY_WORDS for b in TINY_WORDS]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train(tiny_run_config(tmp_path, model, tmp_path / "run", "--train.steps", "2", "--eval.compare_base", "false"),
          log=lambda _: None)
    record = json.loads((tmp_path / "run" / "adapter" / PROMPT_FILE).read_text())
    assert record == {"version": 1, "format": "instruction", "layout": "alpaca", "instruction": "cat dog",
                      "system": None}


def test_typical_rows_is_the_batch_times_the_90th_percentile_length():
    examples = [Example(input_ids=[1] * n, labels=[1] * n) for n in range(1, 11)]  # lengths 1..10
    assert typical_rows(examples, 4) == 4 * 9
    assert typical_rows([], 4) == 0


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_dora_with_per_module_ranks_trains_on_the_bf16_path_and_peft_reads_the_adapter(setup, quantize):
    """DoRA (QDoRA over an NF4 base) with a rank_pattern, from the config file's keys, on the fast bf16 path: it
    learns, its file has the magnitudes and the pattern's ranks, and PEFT gives lorafit's logits with it."""
    peft = pytest.importorskip("peft")
    import lorafit

    tmp_path, model = setup
    cfg = tiny_run_config(tmp_path, model, tmp_path / "dora", "--lora.use_dora", "true", "--lora.rank_pattern",
                          "{q_proj: 2}", "--lora.dropout", "0", "--train.precision", "bf16", "--train.steps", "12",
                          "--model.quantize", quantize)
    report = train(cfg, log=lambda _: None)
    assert report["tuned"]["loss"] < report["base"]["loss"]
    tensors = load_file(tmp_path / "dora" / "adapter" / "adapter_model.safetensors")
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    assert magnitudes and len(magnitudes) == len([k for k in tensors if k.endswith("lora_A.weight")])
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 2
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), tmp_path / "dora" / "adapter")
    ours = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(model), tmp_path / "dora" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_pissa_loraplus_run_resumes_exactly_and_saves_an_adapter_for_the_original_base(setup):
    tmp_path, model = setup
    extra = ("--lora.init", "pissa_niter_2", "--train.loraplus_lr_ratio", "16", "--eval.compare_base", "false")
    train(tiny_run_config(tmp_path, model, tmp_path / "a", *extra), log=lambda _: None)
    train(tiny_run_config(tmp_path, model, tmp_path / "b", *extra), log=lambda _: None)
    (tmp_path / "b" / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step-000003", "step": 3}))
    train(tiny_run_config(tmp_path, model, tmp_path / "b", *extra), resume=True, log=lambda _: None)
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    config = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (16, 32, True)  # r 8 converted
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    import lorafit

    ids = torch.tensor([[1, 3, 4, 5, 6]])
    by_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), tmp_path / "a" / "adapter")
    by_lorafit = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(model), tmp_path / "a" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(by_lorafit(ids).logits, by_peft(ids).logits, rtol=0, atol=1e-5)
