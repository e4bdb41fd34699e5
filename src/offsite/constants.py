"""File names and format tags of everything offsite writes, in one place (as peft's `utils/constants.py`)."""

# A bundle is a Hugging Face model directory with this manifest beside config.json.
MANIFEST = "offsite.json"
BUNDLE_FORMAT = "offsite-bundle"
BUNDLE_FORMAT_VERSION = 1

# An adapter file is a directory with these two files.
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_METADATA = "adapter.json"
ADAPTER_FORMAT = "offsite-adapter"
ADAPTER_FORMAT_VERSION = 1

# One JSON object a line: the training loss of every step and every validation result.
METRICS = "metrics.jsonl"

# A Hugging Face model directory's configs.
MODEL_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# Written weights larger than this are cut into shards (memory while streaming is about one shard).
DEFAULT_SHARD_SIZE = "500MB"
