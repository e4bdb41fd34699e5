"""`offsite bench`: the data owner's training speed and memory, full fine-tuning against offsite-tuning."""
