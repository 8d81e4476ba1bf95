"""Which keys of two config trees differ: the resume checks of `tune` and `data distill`."""

from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys ("train.steps": 4); other values are leaves."""
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Sorted dotted keys whose values differ (present in one tree only included), minus `ignore`."""
    a, b = flatten(old), flatten(new)
    return sorted(key for key in a.keys() | b.keys() if key not in ignore and a.get(key) != b.get(key))
