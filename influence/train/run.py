"""A run directory: the manifest, the warm-up checkpoints and where every later step writes.

Layout::

    runs/x/
      manifest.json                 config, seeds, data hashes, package versions, checkpoints
      checkpoints/epoch-1/          adapter_model.safetensors + adapter_config.json (peft),
                                    optimizer.safetensors (Adam moments keyed by parameter name),
                                    state.json (epoch, optimizer step, mean learning rate, betas, eps)
      dynamics.parquet              per-presentation training dynamics (loss, token accuracy, ...)
      grads.zarr/                   projected gradient stores (see influence.gradients.store), or at the fsspec
                                    URL that stores.json names (``project-grads --store s3://...``)
      subsets.zarr/<name>/          models trained on subsets of the pool and their outcomes

Checkpoints are written to a temporary folder and renamed when complete, so a crash never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import functools
import json
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core.storage import StoreRoot
from ..data.formats import file_sha256, source_exists, source_sha256
from ..errors import RunError

MANIFEST = "manifest.json"
STORES = "stores.json"  # where the gradient stores live, when not in the run folder
OWNER = "influence-run.json"  # in a store hierarchy: the run whose stores it holds
PACKAGES = ("influence", "torch", "transformers", "peft", "zarr", "numpy", "triton")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance() -> dict[str, str | None]:
    """How this process was started and from which code: the command line, and the git commit of the
    influence source when it runs from a checkout (``+dirty`` with uncommitted changes)."""
    return {"command_line": shlex.join(sys.argv), "influence_commit": _source_commit()}


def _source_commit() -> str | None:
    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


@dataclass
class Checkpoint:
    name: str
    path: Path
    epoch: int
    step: int
    mean_lr: float

    @property
    def adapter_file(self) -> Path:
        return self.path / "adapter_model.safetensors"

    def adapter_sha256(self) -> str:
        stat = self.adapter_file.stat()
        return _file_sha256_cached(str(self.adapter_file), stat.st_size, stat.st_mtime_ns)

    def rng_state(self) -> torch.Tensor:
        with safe_open(str(self.path / "optimizer.safetensors"), framework="pt") as tensors:
            return tensors.get_tensor("torch_rng_state")

    def adam_moments(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
        """(first moments, second moments, optimizer hyper-parameters), keyed by parameter name."""
        tensors = load_file(str(self.path / "optimizer.safetensors"))
        state = json.loads((self.path / "state.json").read_text())
        exp_avg = {k[len("exp_avg."):]: v for k, v in tensors.items() if k.startswith("exp_avg.")}
        exp_avg_sq = {k[len("exp_avg_sq."):]: v for k, v in tensors.items() if k.startswith("exp_avg_sq.")}
        return exp_avg, exp_avg_sq, state["optimizer"]


@functools.lru_cache(maxsize=64)
def _file_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, computed once per (path, size, modification time) in a process: every reader
    checks every store against its checkpoint's adapter, and large adapters are slow to hash."""
    return file_sha256(path)


class TrainedState(NamedTuple):
    """What a checkpoint keeps of training, by parameter name, as whole tensors on the CPU (gathered
    first where the processes hold shards: :meth:`LoraTrainer.whole_state`)."""

    weights: dict[str, torch.Tensor]  # the adapter's parameters, named as in ``model.named_parameters()``
    exp_avg: dict[str, torch.Tensor]  # Adam's first moments (absent before the first step)
    exp_avg_sq: dict[str, torch.Tensor]  # and second moments


def save_checkpoint(
    run_dir: Path,
    model,
    optimizer: torch.optim.Optimizer,
    state: TrainedState,
    epoch: int,
    step: int,
    mean_lr: float,
) -> Checkpoint:
    """Write adapter, Adam moments (by parameter name, not integer index) and learning rate."""
    name = f"epoch-{epoch}"
    final = run_dir / "checkpoints" / name
    partial = final.with_name(name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    model.save_pretrained(str(partial), safe_serialization=True, state_dict=state.weights)  # peft names the keys
    _sort_target_modules(partial / "adapter_config.json")
    tensors = {f"exp_avg.{k}": v.contiguous() for k, v in state.exp_avg.items()}
    tensors |= {f"exp_avg_sq.{k}": v.contiguous() for k, v in state.exp_avg_sq.items()}
    tensors["torch_rng_state"] = torch.get_rng_state()  # dropout draws continue identically on resume
    save_file(tensors, str(partial / "optimizer.safetensors"))
    group = optimizer.param_groups[0]
    progress = {
        "epoch": epoch,
        "step": step,
        "mean_lr": mean_lr,
        "optimizer": {"betas": list(group["betas"]), "eps": group["eps"], "weight_decay": group["weight_decay"]},
    }
    (partial / "state.json").write_text(json.dumps(progress, indent=2))
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return Checkpoint(name, final, epoch, step, mean_lr)


def _sort_target_modules(config: Path) -> None:
    """peft writes ``target_modules`` from a set, in an order that changes from process to process (string
    hashing); sorted, a checkpoint's files are the same whenever the same training is run."""
    if not config.is_file():
        return
    data = json.loads(config.read_text(encoding="utf-8"))
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        config.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")  # as peft writes it


DATA_SUFFIXES = (".jsonl", ".json", ".tsv", ".parquet", ".csv", ".gz")


def not_a_run_hint(folder: Path) -> str:
    """What to do with a folder that is not a run: the runs inside it, or the warm-up that makes one (from the data
    files it holds, into a folder of its own)."""
    runs = sorted(str(m.parent) for pattern in ("*/" + MANIFEST, "*/*/" + MANIFEST) for m in folder.glob(pattern))
    if runs:
        return "the runs in it: " + ", ".join(f"--run {r}" for r in runs[:5]) + (" ..." if len(runs) > 5 else "")
    data = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix in DATA_SUFFIXES) if folder.is_dir() else []
    if data:
        files = " ".join(f"--train {p}" for p in data[:3])
        return f"it holds data files: make a run from them with `influence warmup {files} --out runs/NAME`"
    return f"make one with `influence warmup --train POOL --out {folder}` (or give --run the folder a warm-up wrote)"


class Run:
    """Read access to a run directory written by ``influence warmup``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise RunError(f"{self.path}: not a run (no {MANIFEST}); {not_a_run_hint(self.path)}")
        try:
            self.manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunError(f"{manifest_file}: not a readable manifest ({err}); the folder is not a usable run") from None
        missing = [k for k in ("kind", "model", "config", "train_files", "checkpoints") if k not in self.manifest] \
            if isinstance(self.manifest, dict) else ["all fields"]
        if missing:
            raise RunError(f"{manifest_file}: manifest lacks {', '.join(missing)}; the folder is not a usable run")

    @property
    def model_name(self) -> str:
        return self.manifest["model"]

    @property
    def model_loading(self):
        """How the warm-up loaded the base model (dtype, revision...): every later stage loads it the same way."""
        from ..models.loading import ModelLoading

        return ModelLoading.from_manifest(self.manifest.get("model_loading"))

    def load_base_model(self, device=None):
        """(model, tokenizer, fingerprint): the run's base model, loaded as at warm-up and refused when its
        weights are not those the warm-up trained on."""
        from ..models.loading import load_base_model, model_fingerprint, tokenizer_fingerprint

        model, tokenizer = load_base_model(self.model_name, self.model_loading, device)
        fingerprint = model_fingerprint(self.model_name, model)
        self.check_model_unchanged(fingerprint)
        recorded = self.manifest.get("tokenizer")
        if recorded is not None and tokenizer_fingerprint(tokenizer) != recorded:
            raise RunError(f"{self.path}: the tokenizer or chat format of '{self.model_name}' is not the one the warm-up "
                           f"used ({tokenizer_fingerprint(tokenizer)} now, {recorded} then); its token ids would differ")
        return model, tokenizer, fingerprint

    def load_final_model(self, device=None):
        """(model in evaluation mode, tokenizer, the device it is on, the checkpoint): the warm-up's model at its last
        checkpoint, its base checked as :meth:`load_base_model` checks it."""
        from ..models.loading import load_adapter, place

        base, tokenizer, _ = self.load_base_model(device)
        checkpoint = self.checkpoints()[-1]
        model, here = place(load_adapter(base, checkpoint.path).eval(), device)
        return model, tokenizer, here, checkpoint

    def pool(self):
        """The run's pool, read as the warm-up read it (its files, with the column mapping it was given); read once
        per Run, a new list each call."""
        return list(self._pool)

    @functools.cached_property
    def _pool(self) -> tuple:
        from ..data.formats import Columns, load_pool

        return tuple(load_pool(self.train_files, Columns(**self.manifest["config"].get("columns", {}))))

    @functools.cached_property
    def pool_sha256(self) -> str:
        """The fingerprint of the pool's contents that stores and rankings record (``examples_sha256``)."""
        from ..data.formats import examples_sha256

        return examples_sha256(self._pool)

    @property
    def train_files(self) -> list[str]:
        return [entry["path"] for entry in self.manifest["train_files"]]

    @property
    def max_length(self) -> int:
        return int(self.manifest["config"]["max_length"])

    @property
    def run_id(self) -> str | None:
        """The id the warm-up gave the run (None for runs made before ids): its stores and rankings record it."""
        return self.manifest.get("run_id")

    def owns(self, recorded: str | None, what: str) -> None:
        """Refuse ``what`` (a store, a ranking) that records another run's id, naming both runs."""
        if recorded is not None and self.run_id is not None and recorded != self.run_id:
            raise RunError(f"{what} belongs to another run (id {recorded}), not to {self.path} (id {self.run_id}); "
                           "nothing was read or written: point at that run, or give this run its own folder")

    def claim_stores(self, root: StoreRoot | None = None) -> None:
        """Make sure the store hierarchy at ``root`` (default: the run's) is this run's, and mark it so: refused
        when it holds another run's stores, or stores that no run claimed outside this run's folder."""
        root = root or self.store_path
        if self.run_id is None:  # a run made before ids: nothing to compare
            return
        marker = f"{root._full()}/{OWNER}"
        if root.fs.exists(marker):
            owner = json.loads(root.fs.cat_file(marker))
            if owner.get("run_id") != self.run_id:
                raise RunError(f"{root} holds the stores of run {owner.get('run')} (id {owner.get('run_id')}), not of "
                               f"{self.path} (id {self.run_id}); nothing was written: give this run its own --store")
            return
        inside = not root.remote and Path(root.base).is_relative_to(self.path.absolute())
        if root.children() and not inside:
            raise RunError(f"{root} already holds stores that no run claimed (made by another run, or by an influence "
                           f"before stores recorded their run); {self.path} will not write among them: give another "
                           "--store")
        root.fs.makedirs(root._full(), exist_ok=True)
        with root.fs.open(marker, "w") as handle:
            handle.write(json.dumps({"run_id": self.run_id, "run": str(self.path.absolute())}))

    @functools.cached_property
    def store_path(self) -> StoreRoot:
        """Where the run's gradient stores live: ``grads.zarr`` in the run folder, or the location
        :meth:`place_stores` recorded (``project-grads --store URL``), which every later command follows."""
        location = self._store_location()
        if location is None:
            return StoreRoot(self.path / "grads.zarr")
        return StoreRoot(location, locks=self.path / ".locks")

    def _store_location(self) -> str | None:
        file = self.path / STORES
        if not file.is_file():
            return None
        try:
            return str(json.loads(file.read_text(encoding="utf-8"))["grads"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise RunError(f"{file}: not readable ({err!r}); it should say where the run's gradient stores live, "
                           'as {"grads": "s3://bucket/path/grads.zarr"}') from None

    def place_stores(self, location: str | Path) -> None:
        """Keep this run's gradient stores at ``location`` (an fsspec URL such as ``s3://bucket/x/grads.zarr``,
        or a folder), recorded in ``stores.json``. Refused where the run's stores already live elsewhere."""
        from filelock import FileLock

        wanted = StoreRoot(location, locks=self.path / ".locks")  # an unknown protocol is refused here
        (self.path / ".locks").mkdir(exist_ok=True)
        with FileLock(str(self.path / ".locks" / "stores.lock")):  # the processes of one launch all call it
            current = self._store_location()
            current_root = StoreRoot(self.path / "grads.zarr") if current is None else \
                StoreRoot(current, locks=self.path / ".locks")
            if current_root == wanted:
                return
            if current is not None or current_root.children():
                raise RunError(f"{self.path}: its gradient stores live at {current_root}; they cannot move to {wanted} "
                               "(copy them there and edit stores.json, or leave out --store)")
            self.claim_stores(wanted)  # refused before anything is recorded when another run's stores are there
            recorded = wanted.url if wanted.remote else wanted.base  # a folder as an absolute path
            atomic_write(self.path / STORES, lambda tmp: tmp.write_text(json.dumps({"grads": recorded})))
        self.__dict__.pop("store_path", None)

    @property
    def subsets_path(self) -> Path:
        """Where the counterfactual engine's subset models live (``influence subsets train``)."""
        return self.path / "subsets.zarr"

    def checkpoints(self) -> list[Checkpoint]:
        found = []
        for entry in self.manifest.get("checkpoints", []):
            path = self.path / "checkpoints" / entry["name"]
            if not path.is_dir():
                raise RunError(f"{path}: checkpoint listed in the manifest is missing")
            found.append(Checkpoint(entry["name"], path, entry["epoch"], entry["step"], entry["mean_lr"]))
        if not found:
            raise RunError(f"{self.path}: the warm-up saved no checkpoint (interrupted before its first epoch ended?)")
        return found

    def check_model_unchanged(self, fingerprint: str) -> None:
        """The base model's weights must be those the warm-up trained on (see ``model_fingerprint``)."""
        if self.manifest.get("model_fingerprint") != fingerprint:
            raise RunError(
                f"{self.path}: the model '{self.model_name}' is not the one this run was warmed up on (its weights "
                f"or config changed: {fingerprint} now, {self.manifest.get('model_fingerprint')} at warm-up)"
            )

    def check_data_unchanged(self) -> None:
        """The pool files must be byte-identical to those the warm-up saw (ids are file positions)."""
        for entry in self.manifest["train_files"]:
            if not source_exists(entry["path"]):
                raise RunError(f"{entry['path']}: training file of this run is missing")
            if source_sha256(entry["path"]) != entry["sha256"]:
                raise RunError(f"{entry['path']}: training file changed since the warm-up (sha256 differs)")


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def save_npz(path: Path, **arrays) -> None:
    """``np.savez`` to exactly ``path`` (no ``.npz`` appended), the file closed before it is renamed."""
    with path.open("wb") as file:
        np.savez(file, **arrays)


def write_manifest(run_dir: Path, manifest: dict) -> None:
    atomic_write(run_dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
