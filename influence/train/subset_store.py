"""Models trained on subsets of the pool (the counterfactual engine's units) and their outcomes: :class:`SubsetStore`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from ..core.chunks import PARTIAL, check_metadata, checked_codecs, creation_lock, publish_store, remove_partials, write_strings
from ..core.naming import POOL
from ..errors import InfluenceError, StoreMismatchError
from ..models.measure import OUTCOMES

SUBSETS_FORMAT = "influence-subsets"


SUBSETS_VERSION = 1


UNIT_OUTCOMES = OUTCOMES  # rows of a unit's arrays


def drop_mask(n: int, training: list[int], size: int, seed: int, unit: int) -> np.ndarray:
    """Unit ``unit``'s examples of a ``drop`` design (the run's own training replayed with the weights of ``size`` of
    its ``training`` examples at 0, the single-model LDS's models): the training examples but a draw seeded by
    (seed, unit), a pure function of them, so the design grows with ``--k``."""
    mask = np.zeros(n, dtype=bool)
    mask[training] = True
    mask[np.asarray(training)[np.random.default_rng([seed, unit]).choice(len(training), size, replace=False)]] = False
    return mask


def random_mask(n: int, size: int, seed: int, unit: int) -> np.ndarray:
    """Unit ``unit``'s subset of a random design: ``size`` of ``n`` examples, a pure function of
    (seed, unit), so every worker derives the same masks and a design can grow without rewriting."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, unit]).choice(n, size=size, replace=False)] = True
    return mask


class SubsetStore:
    """Models trained on subsets of the pool (the counterfactual engine's units) and their outcomes.

    ``runs/x/subsets.zarr/<name>/`` holds the pool's ids, each evaluated target's ids and subtasks
    (``targets/<dataset>/``), the design (``random``: unit ``k`` trains on :func:`random_mask`;
    ``explicit``: the ``masks`` array, one named row per unit), the training settings and the model
    fingerprint; ``units/unit-<k>/`` holds one finished model's ``mask`` (n_pool bool) and its
    outcomes (:data:`UNIT_OUTCOMES` x examples, float32) on the pool (``pool``) and on every target
    (``target-<...>``). A unit is published whole (built under a temporary name and renamed), so it
    exists complete or not at all; ``claims/`` holds the workers' locks (:class:`~influence.core.units.UnitClaims`).
    """

    def __init__(self, root: str | Path, name: str):
        self.root, self.name = Path(root), name
        self.path = self.root / name
        self.group = zarr.open_group(store=str(self.root), path=name, mode="r")

    @classmethod
    def open(cls, root: str | Path, name: str) -> SubsetStore:
        if not Path(root, name, "zarr.json").is_file():
            known = ", ".join(stored_subsets(root)) or "none"
            raise InfluenceError(f"no subset models named '{name}' in {root} (stored: {known}); "
                                 "train them with `influence subsets train`")
        store = cls(root, name)
        if store.metadata.get("format") != SUBSETS_FORMAT or store.metadata.get("format_version") != SUBSETS_VERSION:
            raise StoreMismatchError("format_version", SUBSETS_VERSION, store.metadata.get("format_version"), str(store.path))
        return store

    @classmethod
    def open_or_create(cls, root: str | Path, name: str, metadata: dict, pool_ids: list[str],
                       targets: dict[str, tuple[list[str], list[str]]], masks: np.ndarray | None = None,
                       weights: np.ndarray | None = None) -> SubsetStore:
        """Open ``root/name`` checking ``metadata`` and the evaluated targets, or create it. Several
        workers may call this at once: creation is serialised by a lock and published whole. ``weights`` (an explicit
        design's, shaped as ``masks``): each unit's per-example loss weights, where they are not all 1."""
        metadata = {"format": SUBSETS_FORMAT, "format_version": SUBSETS_VERSION, **metadata}
        Path(root).mkdir(parents=True, exist_ok=True)
        with creation_lock(root, name):
            if not Path(root, name, "zarr.json").is_file():
                remove_partials(root, name)
                publish_store(root, name, lambda tmp: _build_subsets(root, tmp, metadata, pool_ids, targets, masks,
                                                                     weights))
        store = cls.open(root, name)
        where = str(store.path)
        fields = tuple(k for k in metadata if k not in ("influence_version", "targets"))
        check_metadata(store.metadata, metadata, where + " (another design, model, pool or training settings; "
                       "choose another --name)", fields)
        stored, wanted = set(store.targets), set(targets)
        if stored != wanted:
            raise StoreMismatchError("targets", sorted(wanted), sorted(stored), where + " (these subset models evaluate "
                                     "other targets; give the models that evaluate these another name)")
        if masks is not None and not np.array_equal(store.group["masks"][:], masks):
            raise StoreMismatchError("masks", "the requested subsets", "other subsets", where)
        stored_weights = store.group["weights"][:] if "weights" in store.group else None
        if (stored_weights is None) != (weights is None) or (
                weights is not None and not np.allclose(stored_weights, np.asarray(weights, dtype=np.float32))):
            raise StoreMismatchError("weights", "the requested example weights", "other weights", where)
        return store

    @property
    def metadata(self) -> dict:
        return dict(self.group.attrs)

    @property
    def design(self) -> dict:
        return self.metadata["design"]

    @property
    def n_pool(self) -> int:
        return int(self.metadata["n_pool"])

    @property
    def targets(self) -> dict[str, dict]:
        """Evaluated targets: dataset name -> {target, n_examples, examples_sha256, multiple_choice}."""
        return self.metadata["targets"]

    @property
    def pool_ids(self) -> np.ndarray:
        return self.group["ids"][:]

    def target_labels(self, dataset: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, subtasks) of an evaluated target."""
        self.require_target(dataset)
        return self.group[f"targets/{dataset}/ids"][:], self.group[f"targets/{dataset}/tasks"][:]

    @property
    def pool_measured(self) -> bool:
        """Whether every model was also measured on the pool (not for selection retraining)."""
        return bool(self.metadata.get("pool_measured", True))

    def require_target(self, dataset: str) -> None:
        if dataset == POOL and not self.pool_measured:
            raise InfluenceError(f"{self.path}: these models were not measured on the pool's examples")
        if dataset != POOL and dataset not in self.targets:
            names = ", ".join(t["target"] for t in self.targets.values()) or "none"
            raise InfluenceError(f"{self.path}: these subset models did not evaluate this target (or it changed "
                                 f"since: its content hash differs); they evaluated: {names}. Train subset models "
                                 "that evaluate it (`influence subsets train --target ... --name ...`)")

    @property
    def n_units(self) -> int | None:
        """Units of an explicit design; None for a random design (it grows with ``--k``)."""
        return int(self.group["masks"].shape[0]) if self.design["kind"] == "explicit" else None

    @property
    def unit_names(self) -> list[str]:
        return list(self.design.get("names", []))

    def mask(self, unit: int) -> np.ndarray:
        design = self.design
        if design["kind"] == "explicit":
            return self.group["masks"][unit]
        if design["kind"] == "drop":
            return drop_mask(self.n_pool, design["training"], design["size"], design["seed"], unit)
        return random_mask(self.n_pool, design["size"], design["seed"], unit)

    def unit_weights(self, unit: int) -> np.ndarray | None:
        """An explicit unit's per-example loss weights over the pool, or None (every member weighs 1)."""
        return self.group["weights"][unit].astype(np.float64) if "weights" in self.group else None

    def unit_path(self, unit: int) -> str:
        return f"{self.name}/units/unit-{unit:06d}"

    def is_done(self, unit: int) -> bool:
        return Path(self.root, self.unit_path(unit), "zarr.json").is_file()

    def done_units(self) -> list[int]:
        folder = self.path / "units"
        if not folder.is_dir():
            return []
        return sorted(int(p.name[5:]) for p in folder.iterdir() if p.name.startswith("unit-") and p.name[5:].isdigit()
                      and (p / "zarr.json").is_file())

    def write_unit(self, unit: int, mask: np.ndarray, outcomes: dict[str, dict[str, np.ndarray]], attrs: dict,
                   texts: dict[str, list[str]] | None = None) -> None:
        """Publish one finished unit: its mask, per dataset (``pool`` and each target) its outcomes,
        and optionally texts per dataset (generated responses, ``texts/<dataset>``). Callers hold the
        unit's claim, so leftovers of its earlier attempts are theirs."""
        required = {POOL, *self.targets} if self.pool_measured else set(self.targets)
        missing = sorted(required - set(outcomes))
        if missing:
            raise ValueError(f"unit {unit} lacks outcomes for {missing}")

        def build(tmp: str) -> None:
            group = zarr.create_group(store=str(self.root), path=tmp, attributes=attrs, overwrite=True)
            group.create_array("mask", data=np.asarray(mask, dtype=bool), compressors=checked_codecs())
            for dataset, values in outcomes.items():
                rows = np.stack([np.asarray(values[o], dtype=np.float32) for o in UNIT_OUTCOMES])
                group.create_array(dataset, data=rows, compressors=checked_codecs())
            for dataset, strings in (texts or {}).items():
                write_strings(group, f"texts/{dataset}", strings)

        remove_partials(self.root, self.unit_path(unit))
        publish_store(self.root, self.unit_path(unit), build)

    def outcomes(self, dataset: str, outcome: str, units: list[int] | None = None) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(units, masks (units x n_pool bool), values (units x examples)) of finished units."""
        self.require_target(dataset)
        if outcome not in UNIT_OUTCOMES:
            raise InfluenceError(f"unknown outcome '{outcome}'; choose from {', '.join(UNIT_OUTCOMES)}")
        units = self.done_units() if units is None else units
        row = UNIT_OUTCOMES.index(outcome)
        masks, values = [], []
        for unit in units:
            group = self.unit_group(unit)
            masks.append(group["mask"][:])
            values.append(group[dataset][row])
        n = self.n_pool if dataset == POOL else int(self.targets[dataset]["n_examples"])
        return (units, np.array(masks, dtype=bool).reshape(len(units), self.n_pool),
                np.array(values, dtype=np.float64).reshape(len(units), n))

    def texts(self, unit: int, dataset: str) -> list[str]:
        """A finished unit's texts for a dataset (e.g. its generated responses)."""
        group = self.unit_group(unit)
        if f"texts/{dataset}" not in group:
            raise InfluenceError(f"{self.path}: unit {unit} stored no texts for {dataset}")
        return [str(t) for t in group[f"texts/{dataset}"][:]]

    def unit_group(self, unit: int) -> zarr.Group:
        """A finished unit's arrays, read-only."""
        return zarr.open_group(store=str(self.root), path=self.unit_path(unit), mode="r")

    def unit_attrs(self, unit: int) -> dict:
        return dict(self.unit_group(unit).attrs)


def _build_subsets(root, path: str, metadata: dict, pool_ids: list[str], targets: dict[str, tuple[list[str], list[str]]],
                   masks: np.ndarray | None, weights: np.ndarray | None = None) -> None:
    group = zarr.create_group(store=str(root), path=path, attributes=metadata, overwrite=True)
    write_strings(group, "ids", pool_ids)
    for dataset, (ids, tasks) in targets.items():
        write_strings(group, f"targets/{dataset}/ids", ids)
        write_strings(group, f"targets/{dataset}/tasks", tasks)
    if masks is not None:
        group.create_array("masks", data=np.asarray(masks, dtype=bool), chunks=(1, masks.shape[1]),
                           compressors=checked_codecs())
    if weights is not None:
        group.create_array("weights", data=np.asarray(weights, dtype=np.float32), chunks=(1, weights.shape[1]),
                           compressors=checked_codecs())


def stored_subsets(root: str | Path) -> list[str]:
    """Names of the subset-model stores under ``root`` (``runs/x/subsets.zarr``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "zarr.json").is_file() and PARTIAL not in p.name)
