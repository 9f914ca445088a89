"""The data half of tunesmith: download -> tokenize_count -> filter -> dedupe -> select -> format.

Each module holds plain typed functions over pandas DataFrames of canonical rows (see
tunesmith.data.load for the schema); tunesmith.stages wraps them as the workflow's stages over files.
"""

CANONICAL_COLUMNS = ("id", "instruction", "input", "output", "system", "messages", "text")
COUNT_COLUMNS = ("n_instruction_tokens", "n_output_tokens", "n_tokens")
