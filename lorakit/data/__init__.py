"""Data for supervised fine-tuning of causal language models.

The path from a file to training batches::

    from lorakit.data import batches, build_dataset, eval_pairs, load_records, split_validation

    records, load_report = load_records("train.jsonl")             # chat, alpaca, completion or text
    train, val = split_validation(records, fraction=0.05, seed=0)  # or load a separate file
    dataset, report = build_dataset(train, tokenizer, max_length=512, pack=True)
    for batch in batches(dataset, batch_size=4, seed=0, start=saved_position):
        loss = model(**batch.inputs).loss                          # inputs carry use_cache=False
        saved_position = batch.position.to_dict()                  # JSON, for the checkpoint
    pairs = eval_pairs(val, tokenizer)                             # (prompt, answer) for exact match

Only the tokenizer object comes from transformers; this package does not import transformers.
See docs/data.md for the formats, the Alpaca template, masking, truncation and packing.
"""

from lorakit.data.collate import ModelInputs, collate, collate_examples, collate_packed
from lorakit.data.dataset import BuildReport, TokenizedDataset, build_dataset
from lorakit.data.evaluation import EvalPair, eval_pairs, exact_match
from lorakit.data.formatting import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, Formatted, Segment, format_record
from lorakit.data.jsonl import BadLine, DataFileError, LoadReport, load_records
from lorakit.data.packing import PackedRow, pack_examples
from lorakit.data.records import (
    FORMATS,
    AlpacaRecord,
    ChatRecord,
    CompletionRecord,
    Message,
    Record,
    RecordError,
    TextRecord,
)
from lorakit.data.sampler import Batch, DataPosition, batches, epoch_order, steps_per_epoch
from lorakit.data.split import split_validation
from lorakit.data.tokenize import IGNORE_INDEX, Example

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "FORMATS",
    "IGNORE_INDEX",
    "AlpacaRecord",
    "BadLine",
    "Batch",
    "BuildReport",
    "ChatRecord",
    "CompletionRecord",
    "DataFileError",
    "DataPosition",
    "EvalPair",
    "Example",
    "Formatted",
    "LoadReport",
    "Message",
    "ModelInputs",
    "PackedRow",
    "Record",
    "RecordError",
    "Segment",
    "TextRecord",
    "TokenizedDataset",
    "batches",
    "build_dataset",
    "collate",
    "collate_examples",
    "collate_packed",
    "epoch_order",
    "eval_pairs",
    "exact_match",
    "format_record",
    "load_records",
    "pack_examples",
    "split_validation",
    "steps_per_epoch",
]
