"""Compare recurrent architectures for video classification: Echo State Networks against trained RNNs, fairly,
reproducibly and fast. The modules follow the numbered notebooks in nbs/, from `echoes.core` to `echoes.cli`."""

# The import package is `echoes`; on PyPI that name belongs to another project, so the distribution has its own.
DISTRIBUTION = "echoes-video"
__version__ = "0.1.0"
