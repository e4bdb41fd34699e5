"""Studies on real models: the demo (the paper's Table 1), the emulator ablation and the training benchmark."""
