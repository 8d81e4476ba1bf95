"""Text data: sources, tokenisation, packing, held-out split, resumable batches."""

from eetune.data.batches import TrainBatches
from eetune.data.corpus import IGNORE_INDEX, TuningData, heldout_batch, load_tuning_data
from eetune.data.encode import TokenStream, encode_documents
from eetune.data.sources import Document, Message, load_documents

__all__ = [
    "IGNORE_INDEX",
    "Document",
    "Message",
    "TokenStream",
    "TrainBatches",
    "TuningData",
    "encode_documents",
    "heldout_batch",
    "load_documents",
    "load_tuning_data",
]
