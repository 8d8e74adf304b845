"""Trainer callbacks: progress on stderr, a bar on a terminal."""

import io
import sys


def test_a_terminal_gets_a_progress_bar(monkeypatch):

    from transformers import PrinterCallback, ProgressCallback

    from gata_ft import callbacks

    class Tty(io.StringIO):
        def isatty(self):
            return True

    class FakeTrainer:
        def __init__(self):
            self.callbacks = [PrinterCallback(), ProgressCallback()]

        def remove_callback(self, kind):
            self.callbacks = [c for c in self.callbacks if type(c) is not kind]

        def add_callback(self, callback):
            self.callbacks.append(callback)

    for stream, expected in ((Tty(), "BarProgress"), (io.StringIO(), "PlainProgress")):
        monkeypatch.setattr(sys, "stderr", stream)
        trainer = FakeTrainer()
        callbacks.install_log_callbacks(trainer, print)
        assert [type(c).__name__ for c in trainer.callbacks] == ["EvalPrinter", expected]
