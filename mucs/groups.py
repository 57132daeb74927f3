"""Groups of training items for group-wise attribution (GUDA, LOGO): class labels, styles (ArtBench-10's
labels are its styles), or a user's table of stable id -> group.

Config `groups`: source `label` (the dataset's labels, named by meta class_names when present) or `table`
(groups.table: a CSV with columns `id,group`; every training id needs a row, extra rows are ignored).
Groups are numbered 0..K-1 in the order of their names (numeric names numerically).
"""
import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from mucs.data import Split, remove_ids
from mucs.errors import UserError


@dataclass
class Groups:
    index: torch.Tensor  # int64 [n]: the group number of each training item, aligned with the split
    names: list  # K group names
    ids: torch.Tensor  # int64 [n]: the split's stable ids

    def __len__(self):
        return len(self.names)

    def members(self, k):
        """Stable ids of group k."""
        return self.ids[self.index == k]

    def sizes(self):
        return torch.bincount(self.index, minlength=len(self))

    def digest(self):
        """What the assignment is: ids, groups and names (keys caches of per-group models)."""
        h = hashlib.sha256(self.ids.numpy().tobytes() + self.index.numpy().tobytes())
        h.update("\n".join(self.names).encode())
        return h.hexdigest()[:16]


def name_order(names):
    names = sorted(set(names))
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def read_table(path):
    """{stable id: group name} from a CSV with columns id,group."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"group table {path} does not exist; set groups.table to a CSV with columns id,group")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"id", "group"} <= set(rows[0]):
        raise UserError(f"group table {path} needs a header row with columns id,group and one row per training item")
    table = {}
    for n, r in enumerate(rows, start=2):
        try:
            i = int(r["id"])
        except (TypeError, ValueError):
            raise UserError(f"group table {path} line {n}: id {r['id']!r} is not an integer (ids are the stable ids)")
        g = (r["group"] or "").strip()
        if not g:
            raise UserError(f"group table {path} line {n}: id {i} has an empty group")
        if table.setdefault(i, g) != g:
            raise UserError(f"group table {path} line {n}: id {i} is given two groups ({table[i]!r} and {g!r})")
    return table


def load_groups(gcfg, split: Split, meta) -> Groups:
    """The groups of the training split under config `groups`."""
    if gcfg.source == "label":
        if (split.labels < 0).any():
            raise UserError(f"{int((split.labels < 0).sum())} training items have no label (dataset "
                            f"{meta.get('name')}); use groups.source=table with groups.table=<id,group CSV>")
        class_names = meta.get("class_names") or []
        named = lambda c: str(class_names[c]) if c < len(class_names) else str(c)  # noqa: E731
        labels = split.labels.tolist()
        order = sorted(set(labels))
        names = [named(c) for c in order]
        if len(set(names)) < len(names):
            raise UserError(f"class names {names} are not unique; fix meta.json class_names of the dataset")
        number = {c: k for k, c in enumerate(order)}
        index = torch.tensor([number[c] for c in labels], dtype=torch.long)
    elif gcfg.source == "table":
        if not gcfg.get("table"):
            raise UserError("groups.source=table needs groups.table=<path of a CSV with columns id,group>")
        table = read_table(gcfg.table)
        missing = [i for i in split.ids.tolist() if i not in table]
        if missing:
            raise UserError(f"{len(missing)} training items have no group in {gcfg.table} (e.g. ids {missing[:5]}); "
                            f"add a row id,group for each")
        per_item = [table[i] for i in split.ids.tolist()]
        names = name_order(per_item)
        number = {g: k for k, g in enumerate(names)}
        index = torch.tensor([number[g] for g in per_item], dtype=torch.long)
    else:
        raise UserError(f"groups.source must be label or table, not {gcfg.source!r}")
    if len(names) < 2:
        raise UserError(f"group-wise attribution needs at least 2 groups; the training split has {len(names)}")
    return Groups(index, names, split.ids.clone())


def without(split: Split, groups: Groups, k) -> Split:
    """The training split minus group k (what LOGO model k is trained on)."""
    return remove_ids(split, groups.members(k))


def collapse(scores, groups: Groups, how="mean"):
    """Item scores [Q, n] -> group scores [Q, K] (float64) by the sum, mean or max over each group's items."""
    scores = torch.as_tensor(scores).double()
    K = len(groups)
    if how == "max":
        out = torch.full((len(scores), K), -torch.inf, dtype=torch.float64)
        return out.scatter_reduce(1, groups.index.expand_as(scores), scores, reduce="amax")
    if how not in ("sum", "mean"):
        raise UserError(f"group aggregation must be sum, mean or max, not {how!r}")
    out = torch.zeros(len(scores), K, dtype=torch.float64).index_add_(1, groups.index, scores)
    return out / groups.sizes().double() if how == "mean" else out


def expand(group_scores, groups: Groups):
    """Group scores [Q, K] -> item scores [Q, n]: each training item gets its group's score (the item-level
    view the five-stage pipeline ranks and removes by)."""
    return torch.as_tensor(group_scores)[:, groups.index]
