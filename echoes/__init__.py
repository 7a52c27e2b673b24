"""Compare recurrent architectures for video classification: Echo State Networks against trained RNNs, fairly, reproducibly and fast.

Modules:

- `echoes.train`: Fit and evaluate any `echoes` model the same way: closed-form readouts in one pass, gradient models by epochs with AdamW, a warm-up + cosine schedule, clipping and early stopping; checkpoints every epoch that a killed run resumes from; and the cost metrics (time, latency, throughput, memory, parameters) that make a comparison fair."""

__version__ = "0.1.0"
