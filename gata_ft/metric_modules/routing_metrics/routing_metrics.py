"""An `evaluate` metric module that ships inside gata-ft and is loaded by path.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub,
which fails under network isolation; loading this file by path does not.
The figures come from `gata_ft.metrics.Scores`, the one implementation
behind every report.
"""

import datasets
import evaluate

from gata_ft.metrics import Scores

_DESCRIPTION = """Accuracy, weighted and macro precision/recall/F1, per-class
precision/recall/F1/support and the confusion matrix of a single-label
classifier."""

_INPUTS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    num_classes (int): number of classes; rows and columns of the confusion
        matrix and the per-class lists cover 0 .. num_classes - 1.
Returns:
    accuracy, precision, recall, f1 (weighted by support), precision_macro,
    recall_macro, f1_macro (floats); per_class (dict of lists, index = class
    id); confusion_matrix (list of lists, rows = true, columns = predicted).
    Averages run over the classes that occur in references or predictions
    (scikit-learn's default): a queue absent from the test set has no recall
    to average.
"""


class RoutingMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_classes):
        return Scores.of(predictions, references, num_classes).to_dict()
