"""Every path of an output folder, named once.

    output_dir/
      config.yaml                  the resolved config
      data/splits.json             reward pairs, RL prompts, held-out prompts
      reward_model/                the Bradley–Terry reward model (+ metrics.json); with K members, their average
      reward_members/member_<k>/   member k of the K averaged (WARM), each with its metrics.json
      iter_<i>/init.safetensors    θ_init of iteration i
      iter_<i>/run_<m>/            one REINFORCE run (`RunFolder`); with `log_completions`, its
                                   completions/step_<n>.jsonl: prompts, completions and rewards
      iter_<i>/slerp.safetensors   θ_slerp^i
      final/                       θ_slerp^I, `save_pretrained`
      reinforce/                   the REINFORCE baseline (`RunFolder`), its final/ inside
      eval/                        results, completions, plots; eval/policies/<name>.json
      report.md, timings.json
      inputs/                      the models and data `WarpTrainer` was given as objects, saved once
      .warp-rlhf.lock              held by the process working in the folder
      .warp-rlhf.json              the entries above that warp-rlhf created (`OWNED_ENTRIES`)

It sits at the package's top, not under `stages/`, because the algorithm writes run folders
and merges and must not import the stages above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REWARD_METRICS = "metrics.json"
LOCK_FILE = ".warp-rlhf.lock"
"""Held (`flock`) by the process working in the folder (`stages.output.OutputLock`)."""
MANIFEST = ".warp-rlhf.json"
"""The top-level entries warp-rlhf created in the folder: the only ones it may delete or write
over (`stages.output`)."""
OWNED_ENTRIES = (
    "config.yaml", "data", "reward_model", "reward_members", "final", "reinforce", "eval", "report.md",
    "timings.json", "sweep", "tensorboard", "wandb", "inputs", "rloo_ema", "rloo_fixed",
)  # fmt: skip
"""The top-level entries a command may write, besides `iter_<i>` (`OutputDir.entries`)."""


@dataclass(frozen=True)
class RunFolder:
    """One REINFORCE run's files. `done.json` is written last: a run is finished when it exists."""

    path: Path

    @property
    def done(self) -> Path:
        return self.path / "done.json"

    @property
    def policy(self) -> Path:
        return self.path / "policy.safetensors"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def checkpoint_state(self) -> Path:
        """Written last into a checkpoint: the step, the optimiser's groups, the run's settings."""
        return self.checkpoint / "state.json"

    def snapshots(self) -> list[Path]:
        return sorted(self.path.glob("step_*.safetensors"))

    def snapshot(self, step: int) -> Path:
        """The policy after `step` steps, kept for the baseline's trajectory."""
        return self.path / f"step_{step}.safetensors"

    def completions(self, step: int) -> Path:
        """With `log_completions`, step `step`'s prompts, completions and rewards, one JSON line each."""
        return self.path / "completions" / f"step_{step}.jsonl"

    def completion_tables(self) -> dict[int, Path]:
        """Every completions table of the run, by step."""
        return {int(path.stem.removeprefix("step_")): path for path in self.path.glob("completions/step_*.jsonl")}


@dataclass(frozen=True)
class OutputDir:
    """The paths of one output folder."""

    root: Path

    def entries(self, iterations: int) -> list[str]:
        """The names of every top-level entry a command of `iterations` WARP iterations may write."""
        return [*OWNED_ENTRIES, *(self.iteration(i).name for i in range(1, iterations + 1))]

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def splits(self) -> Path:
        return self.root / "data" / "splits.json"

    @property
    def reward_model(self) -> Path:
        return self.root / "reward_model"

    @property
    def reward_metrics(self) -> Path:
        """The reward model's held-out accuracy; written last, so the model is finished when it exists."""
        return self.reward_model / REWARD_METRICS

    @property
    def reward_members(self) -> Path:
        """The reward models averaged into `reward_model` (WARM), beside it so that writing the
        average, which replaces `reward_model/`, keeps them."""
        return self.root / "reward_members"

    def reward_member(self, k: int) -> Path:
        """Member k (from 1); finished when its metrics.json exists."""
        return self.reward_members / f"member_{k}"

    def finished_reward_members(self) -> list[Path]:
        return sorted(path.parent for path in self.reward_members.glob(f"member_*/{REWARD_METRICS}"))

    def iteration(self, i: int) -> Path:
        return self.root / f"iter_{i}"

    def init(self, i: int) -> Path:
        """θ_init of iteration i (θ_sft for i = 1, the previous LITI point after)."""
        return self.iteration(i) / "init.safetensors"

    def slerp(self, i: int) -> Path:
        return self.iteration(i) / "slerp.safetensors"

    def run(self, i: int, m: int) -> RunFolder:
        return RunFolder(self.iteration(i) / f"run_{m}")

    def runs(self) -> list[RunFolder]:
        """Every WARP run folder there is, iteration by iteration."""
        return [RunFolder(path) for path in sorted(self.root.glob("iter_*/run_*")) if path.is_dir()]

    def merges(self) -> list[Path]:
        return sorted(self.root.glob("iter_*/slerp.safetensors"))

    @property
    def final(self) -> Path:
        """θ_slerp^I as a `from_pretrained` folder."""
        return self.root / "final"

    @property
    def baseline(self) -> RunFolder:
        return RunFolder(self.root / "reinforce")

    @property
    def baseline_final(self) -> Path:
        return self.baseline.path / "final"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def evaluated(self, policy: str) -> Path:
        """One evaluated policy's per-prompt values, kept so an interrupted evaluation resumes."""
        return self.eval / "policies" / f"{policy}.json"

    def evaluated_all(self) -> list[Path]:
        return sorted((self.eval / "policies").glob("*.json"))

    @property
    def tensorboard(self) -> Path:
        """With `report_to: tensorboard`, one folder of event files per tracked run."""
        return self.root / "tensorboard"

    def sweep_values(self) -> list[Path]:
        """A sweep's folders, one per value, each an output folder of its own."""
        return sorted(self.root.glob("sweep/*=*"))

    @property
    def inputs(self) -> Path:
        """Objects given to `WarpTrainer` (models, datasets), saved under a fingerprint of what they are."""
        return self.root / "inputs"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"
