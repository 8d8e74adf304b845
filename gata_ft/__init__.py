"""gata-ft: fine-tune a BERT ticket router and export it for CPU serving."""

__version__ = "0.1.0"
