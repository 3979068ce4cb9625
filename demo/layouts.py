"""Group layouts: the same trained experts grouped in other ways (pure Python, no torch).

The paper asks how many groups, and how many experts per group, are best. With the experts fixed, a
layout is a partition of them into groups: N_G groups of at most N_M experts. The demo compares the
suite's own layout (one group per intent kind: functional, domain, style) with:

- ``one_group``: every expert in one group (N_G = 1, N_M = E): a plain MoE, one softmax over all experts;
- ``mixed_groups``: as many groups, of the same sizes, as the suite's layout, but each group mixing intent
  kinds (experts dealt round-robin in suite order): groups that do not follow the intents;
- ``solo_groups``: one expert per group (N_G = E, N_M = 1): the group softmax is again one softmax over
  all experts.

Every layout runs through the grouped router and the same routing loss (see ``atmoe.training``), which
can only say which expert *inside a group* is intended. So the layout decides what the intents can
teach: with the suite's layout each group has exactly one intended expert; with one group the three
intended experts share one softmax and the loss pulls each towards 1/3 in every block; with solo groups
there is nothing inside a group to choose and the router learns from the language-model loss alone.

An expert belongs to one catalog group, so a layout registers the same adapters again under its own
names and groups (``count`` -> ``count-mixed`` in group ``mixed-1``): new catalog rows, the same blobs
(the store is content-addressed). Intents in the router data are renamed to match.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("one_group", "mixed_groups", "solo_groups")
SUFFIX = {"one_group": "one", "mixed_groups": "mixed", "solo_groups": "solo"}
LABELS = {
    "intent_groups": "the suite's groups",  # one group per intent kind: AT-MoE as the demo composes it
    "one_group": "one group of all experts",
    "mixed_groups": "kinds mixed in each group",
    "solo_groups": "one expert per group",
}


@dataclass(frozen=True)
class Layout:
    """A partition of the suite's experts into groups, under names of the layout's own."""

    name: str
    groups: dict[str, tuple[str, ...]]  # group -> layout expert names, in slot order
    source: dict[str, str]  # layout expert name -> suite expert name

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def n_max(self) -> int:
        return max(len(v) for v in self.groups.values())

    def rename(self, example: dict) -> dict:
        """``example`` with its intents named as this layout's experts."""
        back = {suite: mine for mine, suite in self.source.items()}
        return {**example, "intents": [back[name] for name in example.get("intents", [])]}


def make_layout(name: str, suite_groups: dict[str, tuple[str, ...]]) -> Layout:
    """The layout ``name`` (one of ``LAYOUTS``) of the experts in ``suite_groups`` (group -> experts)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    experts = [e for names in suite_groups.values() for e in names]
    suffix = SUFFIX[name]
    mine = {e: f"{e}-{suffix}" for e in experts}
    if name == "one_group":
        groups = {"all-one": tuple(mine[e] for e in experts)}
    elif name == "solo_groups":
        groups = {f"solo-{e}": (mine[e],) for e in experts}
    else:
        n = len(suite_groups)
        dealt: list[list[str]] = [[] for _ in range(n)]
        for i, e in enumerate(experts):
            dealt[i % n].append(mine[e])
        groups = {f"mixed-{i + 1}": tuple(members) for i, members in enumerate(dealt)}
    return Layout(name=name, groups=groups, source={v: k for k, v in mine.items()})
