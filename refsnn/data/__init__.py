"""Dataset readers and the dataset registry (see registry.py for names and lookup order)."""

from refsnn.data.eventsets import EventDataset
from refsnn.data.idx import read_idx, write_idx
from refsnn.data.registry import (
    Dataset,
    DatasetInfo,
    list_datasets,
    load_dataset,
    stratified_counts,
    subset,
)

__all__ = [
    "read_idx",
    "write_idx",
    "Dataset",
    "DatasetInfo",
    "load_dataset",
    "list_datasets",
    "subset",
    "stratified_counts",
    "EventDataset",
]
