"""Methods beside LoRA: what each trains, MeZO's estimate, in-context prompts, and their files round-tripping."""

import pytest
import torch

import lorafit
from lorafit.data import Row
from lorafit.methods import MethodConfig, MethodError, is_method_folder, load_method, save_method
from lorafit.methods import setup as setup_method
from lorafit.methods.incontext import few_shot_prompts
from lorafit.methods.mezo import MeZO
from lorafit.methods.select import blocks_of
from tests.conftest import tiny_bert, tiny_gpt2, tiny_job, tiny_llama, tiny_run_config, tiny_tokenizer


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_full_trains_everything_and_freeze_only_the_top_blocks_and_final_norm():
    model = tiny_llama()
    setup_method(model, MethodConfig(name="full"), lorafit.LoraConfig())
    assert trainable(model) == {name for name, _ in model.named_parameters()}
    setup_method(model, MethodConfig(name="freeze", top_blocks=1), lorafit.LoraConfig())
    names = trainable(model)
    assert names and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in names)
    assert "model.norm.weight" in names and not any(n.startswith("model.layers.0.") for n in names)
    with pytest.raises(MethodError, match="only 2 blocks"):
        setup_method(model, MethodConfig(name="freeze", top_blocks=3), lorafit.LoraConfig())


def test_blocks_are_found_in_llama_gpt2_and_bert():
    assert blocks_of(tiny_llama())[0] == "model.layers"
    assert blocks_of(tiny_gpt2())[0] == "transformer.h"
    assert blocks_of(tiny_bert())[0] == "bert.encoder.layer"


def test_bitfit_trains_biases_and_a_classifier_head_and_refuses_a_bias_free_llama():
    gpt2 = tiny_gpt2()
    setup_method(gpt2, MethodConfig(name="bitfit"), lorafit.LoraConfig())
    assert trainable(gpt2) and all(n.endswith(".bias") for n in trainable(gpt2))
    bert = tiny_bert()
    setup_method(bert, MethodConfig(name="bitfit"), lorafit.LoraConfig())
    assert {"classifier.weight", "classifier.bias"} <= trainable(bert)
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in trainable(bert))
    with pytest.raises(MethodError, match="no bias parameters"):
        setup_method(tiny_llama(), MethodConfig(name="bitfit"), lorafit.LoraConfig())


def test_mezo_step_is_the_two_point_estimate_along_one_direction():
    """Independent check from the outside: record θ at both loss calls, then verify the update."""
    theta = torch.nn.Parameter(torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    start = theta.detach().clone()
    seen = []

    def closure():
        seen.append(theta.detach().clone())
        return 0.5 * (theta ** 2).sum()  # L = ½‖θ‖²: the central difference is exact, g = zᵀθ

    opt = MeZO([theta], lr=0.1, eps=1e-3)
    opt.step(closure)
    plus, minus = seen
    torch.testing.assert_close((plus + minus) / 2, start, atol=1e-12, rtol=0)
    z = (plus - minus) / 2e-3  # the direction, recovered from the two evaluation points
    assert 0.5 < z.std().item() < 1.5  # a standard normal draw
    projected = (0.5 * (plus ** 2).sum() - 0.5 * (minus ** 2).sum()) / 2e-3
    torch.testing.assert_close(projected, (z * start).sum(), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(theta.detach(), start - 0.1 * projected * z, atol=1e-9, rtol=1e-9)


def test_mezo_lowers_a_loss_and_resumes_from_its_state_dict():
    def run(steps, resume_at=None):
        theta = torch.nn.Parameter(torch.ones(20))
        opt = MeZO([theta], lr=0.05, eps=1e-3, seed=7)
        for i in range(steps):
            if i == resume_at:  # rebuild from a saved state, as a checkpoint does
                saved = (theta.detach().clone(), opt.state_dict())
                theta = torch.nn.Parameter(saved[0])
                opt = MeZO([theta], lr=0.05, eps=1e-3, seed=0)
                opt.load_state_dict(saved[1])
            opt.step(lambda p=theta: 0.5 * (p ** 2).sum())
        return theta.detach()

    final = run(200)
    assert (final ** 2).sum() < 0.25 * 20  # from ½‖1‖² = 10: zeroth-order descent works
    torch.testing.assert_close(run(10, resume_at=4), run(10), atol=0, rtol=0)


def test_a_method_folder_loads_back_exactly_and_a_mismatch_changes_nothing(tmp_path):
    model = tiny_gpt2()
    method = MethodConfig(name="bitfit")
    setup_method(model, method, lorafit.LoraConfig())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    ids = torch.randint(0, 128, (2, 9))
    expected = model(input_ids=ids).logits
    save_method(model, tmp_path / "bitfit", method, "tiny-gpt2", "causal-lm")
    assert is_method_folder(tmp_path / "bitfit")
    fresh = tiny_gpt2()
    load_method(fresh, tmp_path / "bitfit")
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected, atol=0, rtol=0)
    llama = tiny_llama()
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(MethodError, match="does not fit this model"):
        load_method(llama, tmp_path / "bitfit")
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())


def test_few_shot_prompts_put_the_examples_before_the_question():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    row = lambda q, a: Row({"instruction": q, "input": "", "output": a}, "t.jsonl", 1)  # noqa: E731
    pairs = few_shot_prompts([row("cat dog", "dog")], [row("hello world", "world"), row("dog cat", "cat")],
                             "instruction", tok)
    assert pairs == [("[user] hello world [assistant] world [user] dog cat [assistant] cat [user] cat dog ", "dog")]
    with pytest.raises(MethodError, match="instruction or chat"):
        few_shot_prompts([Row({"text": "x"}, "t.jsonl", 1)], [], "text", tok)


@pytest.mark.parametrize("method", ["full", "freeze", "mezo"])
def test_train_runs_each_method_and_its_result_loads_back(tmp_path, method):
    from lorafit.inference.generate import load_with_adapters
    from lorafit.inference.scoring import mean_loss
    from lorafit.training.recipe import train

    tmp_path, model = tiny_job(tmp_path)
    cfg = tiny_run_config(tmp_path, model, tmp_path / method, "--method", method, "--method.top_blocks", "1",
                          "--train.steps", "8", "--train.lr", "1e-3" if method != "mezo" else "1e-2")
    report = train(cfg, log=lambda _: None)
    assert report["method"] == method and report["peak_rss_mb_train"] > 0
    if method != "mezo":  # gradient methods must learn in 8 steps; MeZO only has to run and save
        assert report["tuned"]["loss"] < report["base"]["loss"]
    folder = tmp_path / method / "adapter"
    assert is_method_folder(folder) == (method != "mezo")  # MeZO over LoRA saves a PEFT adapter
    net, tok, _ = load_with_adapters(None, [str(folder)])
    from lorafit.data import encode, load_splits
    _, val_rows, fmt = load_splits(cfg.data)
    loss = mean_loss(net, encode(val_rows, fmt, tok, cfg.data), cfg.eval.batch_size, tok.pad_token_id)
    assert loss == pytest.approx(report["tuned"]["loss"], rel=1e-5)
