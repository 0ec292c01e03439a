"""The training loop's stopping rules, with a scripted validation curve; checkpoints
under the accelerate back-ends that this machine cannot run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from accelerate.utils import DistributedType

from rrec.train.loop import Checkpoints, LoopConfig, Progress, run_loop


class _NoCheckpoints:
    def save(self, progress: Progress) -> None:
        pass


def _run(curve: list[float], **cfg: Any) -> tuple[Progress, list[int]]:
    """Evaluations every 10 steps read `curve` in order; returns the progress and the
    steps whose model was saved as the best."""
    values = iter(curve)
    saved: list[int] = []
    config = LoopConfig(n_examples=1000, batch_size=10, epochs=1, max_steps=None, eval_every=10,
                        checkpoint_every=1000, patience=2, seed=0, **cfg)
    progress = run_loop(
        config, SimpleNamespace(is_main_process=False), _NoCheckpoints(),
        step_fn=lambda batch, step: {"loss": 1.0},
        eval_fn=lambda step: {"ndcg@10": next(values)},
        on_best=saved.append, log_fn=lambda scalars, step: None,
    )
    return progress, saved


PLATEAU_THEN_LEARNS = [0.010, 0.004, 0.008, 0.009, 0.030, 0.040, 0.035, 0.036, 0.037, 0.038]


def test_patience_alone_stops_on_an_early_plateau() -> None:
    progress, saved = _run(PLATEAU_THEN_LEARNS)
    assert progress.stopped == "early_stopping" and progress.step == 30
    assert saved == [10] and progress.best_metric == 0.010


def test_min_steps_waits_out_the_plateau_then_patience_applies() -> None:
    progress, saved = _run(PLATEAU_THEN_LEARNS, min_steps=50)
    # 20, 30, 40 do not improve on 10, but nothing stops before step 50; 50 and 60 improve,
    # 70 and 80 do not: stopped at 80 with the model of step 60
    assert progress.stopped == "early_stopping" and progress.step == 80
    assert saved == [10, 50, 60] and progress.best_step == 60 and progress.best_metric == 0.040


def test_the_starting_weights_are_evaluated_but_never_kept() -> None:
    evaluated: list[int] = []
    logged: list[dict[str, float]] = []
    saved: list[int] = []
    config = LoopConfig(n_examples=300, batch_size=10, epochs=1, max_steps=None, eval_every=10,
                        checkpoint_every=1000, patience=2, seed=0, eval_at_start=True)

    def eval_fn(step: int) -> dict[str, float]:
        evaluated.append(step)
        # the start scores best, as an untrained policy could on a short run
        return {"ndcg@10": 0.5 if step == 0 else 0.1 * step / 10, "train_reward": 0.2}

    progress = run_loop(
        config, SimpleNamespace(is_main_process=False), _NoCheckpoints(),
        step_fn=lambda batch, step: {"loss": 1.0}, eval_fn=eval_fn,
        on_best=saved.append, log_fn=lambda scalars, step: logged.append(scalars),
    )
    assert evaluated == [0, 10, 20, 30]
    assert [e["step"] for e in progress.evals] == [0, 10, 20, 30]
    assert saved == [10, 20, 30] and progress.best_step == 30
    # validation metrics are logged as valid_*, the train probe's reward under its own name
    assert logged[0] == {"valid_ndcg@10": 0.5, "train_reward": 0.2}


def test_the_time_split_sums_each_part_of_the_run_where_it_is_spent() -> None:
    """Each part's sum is the time of the calls it wraps: here every call sleeps a known
    time, so each part's sum is at least its calls' sleeps and the parts fit in the total."""
    import time

    from rrec.timing import Phases

    def sleeping(seconds: float, result: Any = None) -> Any:
        def call(*args: Any) -> Any:
            time.sleep(seconds)
            return result
        return call

    class _SleepingCheckpoints:
        def save(self, progress: Progress) -> None:
            time.sleep(0.02)

    phases = Phases("train")
    config = LoopConfig(n_examples=40, batch_size=10, epochs=1, max_steps=None, eval_every=2,
                        checkpoint_every=2, patience=9, seed=0, eval_at_start=True)
    values = iter([0.1, 0.2, 0.3])
    run_loop(
        config, SimpleNamespace(is_main_process=False), _SleepingCheckpoints(),
        step_fn=sleeping(0.03, {"loss": 1.0}),
        eval_fn=lambda step: (time.sleep(0.05), {"ndcg@10": next(values)})[1],
        on_best=sleeping(0.01), log_fn=sleeping(0.001), phases=phases,
    )
    # 4 steps, evaluations at 0, 2 and 4, both improving, checkpoints at 2 and 4,
    # 4 step logs and 3 evaluation logs
    expected = {"evaluations": 3 * 0.05, "training steps": 4 * 0.03, "logging": 7 * 0.001,
                "best-model saves": 2 * 0.01, "checkpoints": 2 * 0.02}
    assert set(phases.seconds) == set(expected)
    for name, slept in expected.items():
        assert phases.seconds[name] >= slept, name
    assert sum(phases.seconds.values()) <= phases.total()
    table = phases.table().splitlines()
    assert table[0].startswith("[train] time split of ") and len(table) == 1 + len(expected)


class _RecordingAccelerator:
    """What `Checkpoints` calls on an accelerator, recorded."""

    def __init__(self, distributed_type: DistributedType) -> None:
        self.distributed_type = distributed_type
        self.hooks: list[Any] = []
        self.load_kwargs: dict[str, Any] = {}

    def register_save_state_pre_hook(self, hook: Any) -> None:
        self.hooks.append(hook)

    def load_state(self, input_dir: str, **kwargs: Any) -> None:
        self.load_kwargs = kwargs


@pytest.mark.parametrize(
    ("kind", "expected"),
    [(DistributedType.NO, {"strict": False}), (DistributedType.MULTI_GPU, {"strict": False}),
     (DistributedType.DEEPSPEED, {"load_module_strict": False})],
)
def test_resuming_loads_the_trainable_weights_loosely_under_every_backend(tmp_path: Path, kind, expected) -> None:
    # accelerate hands these keywords to DeepSpeed's load_checkpoint, which has no `strict`
    acc = _RecordingAccelerator(kind)
    (tmp_path / "step-0000010").mkdir()
    (tmp_path / "step-0000010" / "progress.json").write_text(Progress(step=10).to_json())
    assert Checkpoints(tmp_path, acc).load(tmp_path / "step-0000010").step == 10
    assert acc.load_kwargs == expected


def test_saving_keeps_only_trainable_weights_and_lets_deepspeed_save_its_own() -> None:
    acc = _RecordingAccelerator(DistributedType.NO)
    Checkpoints(Path("unused"), acc)
    (hook,) = acc.hooks
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    state = dict(model.state_dict())
    hook([model], [state], "dir")
    assert list(state) == ["weight"]
    hook([model], [], "dir")  # DeepSpeed: models, but no state dicts
