"""An `evaluate` metric module that ships inside gata-ft and is loaded by path.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub,
which fails under network isolation; loading this file by path does not.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

_DESCRIPTION = """Accuracy, weighted and macro precision/recall/F1, per-class
precision/recall/F1/support and the confusion matrix of a single-label
classifier, computed with scikit-learn."""

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
        classes = list(range(num_classes))
        y_true, y_pred = np.asarray(references), np.asarray(predictions)
        result = {"accuracy": float(accuracy_score(y_true, y_pred))}
        # Averages run over the classes that occur in references or predictions
        # (scikit-learn's default): a queue absent from the test set has no
        # recall to average.
        for average, suffix in (("weighted", ""), ("macro", "_macro")):
            p, r, f, _ = precision_recall_fscore_support(
                y_true, y_pred, average=average, zero_division=0
            )
            result.update({f"precision{suffix}": float(p), f"recall{suffix}": float(r)})
            result[f"f1{suffix}"] = float(f)
        p, r, f, s = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, average=None, zero_division=0
        )
        result["per_class"] = {
            "precision": p.tolist(),
            "recall": r.tolist(),
            "f1": f.tolist(),
            "support": s.tolist(),
        }
        result["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=classes).tolist()
        return result
