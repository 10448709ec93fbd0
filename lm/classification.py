"""Classification evaluation: confusion matrix, per-class report, binary-task curves, plots.

Shape key: B batch, K classes, N score bins. Confusion rows are true classes, columns
predicted classes. Binary tasks also sum a histogram of the positive class's probability per
true class ([2, N]): additive over batches and devices like the confusion matrix, and enough
to draw the ROC and precision-recall curves and to pick a decision threshold on the host.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from lm import metrics as metrics_lib


def _pyplot():
  """matplotlib on first plot: importing it costs every run ~0.3 s and ~40 MiB."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # Files only; training hosts have no display.
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  return pyplot


def confusion_matrix(preds_B: jax.Array, targets_B: jax.Array, mask_B: jax.Array,
                     num_classes: int) -> jax.Array:
  """[K, K] int32 counts of (true, predicted) over the rows where mask is 1.

  A one-hot matmul rather than a scatter: with the batch sharded it reduces like a sum.
  """
  true_BxK = jax.nn.one_hot(targets_B, num_classes, dtype=jnp.float32) * mask_B[:, None]
  pred_BxK = jax.nn.one_hot(preds_B, num_classes, dtype=jnp.float32)
  return jnp.einsum('bt,bp->tp', true_BxK, pred_BxK).round().astype(jnp.int32)


SCORE_BINS = 1000  # Thresholds are multiples of 1/1000: finer than any split here can resolve.


def score_histogram(p_B: jax.Array, targets_B: jax.Array, mask_B: jax.Array,
                    positive: int) -> jax.Array:
  """[2, N] int32 counts of the positive class's probability, row 1 for true positives."""
  bins_B = jnp.clip((p_B * SCORE_BINS).astype(jnp.int32), 0, SCORE_BINS - 1)
  is_pos_B = (targets_B == positive).astype(jnp.float32)
  rows_Bx2 = jnp.stack([1.0 - is_pos_B, is_pos_B], axis=1) * mask_B[:, None]
  return jnp.einsum('br,bn->rn', rows_Bx2,
                    jax.nn.one_hot(bins_B, SCORE_BINS, dtype=jnp.float32)).round().astype(
                        jnp.int32)


def _counts_above(hist_2xN) -> tuple[np.ndarray, np.ndarray]:
  """(negatives, positives) with score >= each threshold k / N, k = 0..N: [N + 1] each."""
  h = np.asarray(hist_2xN, np.float64)
  above = np.concatenate([np.cumsum(h[:, ::-1], axis=1)[:, ::-1], np.zeros((2, 1))], axis=1)
  return above[0], above[1]


def binary_confusion(hist_2xN, threshold: float, positive: int) -> np.ndarray:
  """[2, 2] confusion (in class-index order) when predicting positive at score >= threshold."""
  neg_above, pos_above = _counts_above(hist_2xN)
  k = int(round(threshold * SCORE_BINS))
  tp, fp = pos_above[k], neg_above[k]
  fn, tn = pos_above[0] - tp, neg_above[0] - fp
  c = np.array([[tn, fp], [fn, tp]])  # Rows: negative, positive.
  return c if positive == 1 else c[::-1, ::-1]


def best_threshold(hist_2xN) -> tuple[float, float]:
  """(threshold, F1 of the positive class there): the threshold that maximises that F1."""
  neg_above, pos_above = _counts_above(hist_2xN)
  tp, fp, fn = pos_above, neg_above, pos_above[0] - pos_above
  f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0)
  k = int(np.argmax(f1))  # The lowest threshold among ties: argmax takes the first.
  return k / SCORE_BINS, float(f1[k])


def roc_auc(hist_2xN) -> float:
  """Area under the ROC curve; scores within one bin count as ties (half credit)."""
  neg_above, pos_above = _counts_above(hist_2xN)
  if not neg_above[0] or not pos_above[0]:
    return float('nan')
  fpr, tpr = neg_above[::-1] / neg_above[0], pos_above[::-1] / pos_above[0]
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def save_pr_png(hist_2xN, path: str, threshold: float) -> None:
  """Precision against recall over every threshold, the chosen one marked."""
  neg_above, pos_above = _counts_above(hist_2xN)
  keep = (pos_above + neg_above) > 0
  recall = pos_above[keep] / max(pos_above[0], 1)
  precision = pos_above[keep] / (pos_above[keep] + neg_above[keep])
  k = int(round(threshold * SCORE_BINS))
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 4))
  ax.plot(recall, precision)
  if pos_above[k] + neg_above[k]:
    ax.plot([pos_above[k] / max(pos_above[0], 1)], [pos_above[k] / (pos_above[k] + neg_above[k])],
            'o', label=f'threshold {threshold:.3f}')
    ax.legend()
  ax.set(xlabel='recall', ylabel='precision', xlim=(0, 1.02), ylim=(0, 1.02),
         title=f'ROC AUC {roc_auc(hist_2xN):.4f}')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def per_class_report(confusion_KxK, class_names) -> tuple[dict, str]:
  """(report, markdown table) with precision, recall, F1 and support per class.

  The report holds 'accuracy', 'macro_precision', 'macro_recall', 'macro_f1' and 'per_class'
  ({name: {'precision', 'recall', 'f1', 'support'}}). A class never predicted (or never
  present) gets precision (recall) 0, as scikit-learn does. The macro averages are over the
  classes present or predicted (scikit-learn's labels): a class the split lacks and the model
  never predicts has nothing to score, and counting it as 0 would sink a partial split's macro-F1.
  """
  c = np.asarray(confusion_KxK, np.float64)
  tp_K = np.diag(c)
  predicted_K, support_K = c.sum(axis=0), c.sum(axis=1)
  precision_K = np.divide(tp_K, predicted_K, out=np.zeros_like(tp_K), where=predicted_K > 0)
  recall_K = np.divide(tp_K, support_K, out=np.zeros_like(tp_K), where=support_K > 0)
  denom_K = precision_K + recall_K
  f1_K = np.divide(2 * precision_K * recall_K, denom_K, out=np.zeros_like(tp_K),
                   where=denom_K > 0)
  seen_K = (predicted_K + support_K) > 0
  macro = lambda x_K: float(x_K[seen_K].mean()) if seen_K.any() else 0.0  # pylint: disable=unnecessary-lambda-assignment
  report = {
      'accuracy': float(tp_K.sum() / max(c.sum(), 1)),
      'macro_precision': macro(precision_K),
      'macro_recall': macro(recall_K),
      'macro_f1': macro(f1_K),
      'per_class': {name: {'precision': float(p), 'recall': float(r), 'f1': float(f),
                           'support': int(s)}
                    for name, p, r, f, s in zip(class_names, precision_K, recall_K, f1_K,
                                                support_K)},
  }
  lines = ['| class | precision | recall | F1 | support |', '| --- | ---: | ---: | ---: | ---: |']
  for name, row in report['per_class'].items():
    lines.append(f'| {name} | {row["precision"]:.4f} | {row["recall"]:.4f} | {row["f1"]:.4f} '
                 f'| {row["support"]} |')
  lines.append(f'| **macro** | {report["macro_precision"]:.4f} | {report["macro_recall"]:.4f} '
               f'| {report["macro_f1"]:.4f} | {int(support_K.sum())} |')
  return report, '\n'.join(lines)


def save_confusion_png(confusion_KxK, class_names, path: str) -> None:
  """Row-normalised heatmap (recall per true class) annotated with the raw counts."""
  c = np.asarray(confusion_KxK)
  rows = c.sum(axis=1, keepdims=True)
  share = np.divide(c, rows, out=np.zeros(c.shape), where=rows > 0)
  k = len(class_names)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(1 + 0.6 * k, 0.8 + 0.6 * k))
  ax.imshow(share, cmap='Blues', vmin=0, vmax=1)
  for t in range(k):
    for p in range(k):
      ax.text(p, t, str(c[t, p]), ha='center', va='center', fontsize=7,
              color='white' if share[t, p] > 0.5 else 'black')
  ax.set_xticks(range(k), class_names, rotation=45, ha='right')
  ax.set_yticks(range(k), class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(f'accuracy {np.trace(c) / max(c.sum(), 1):.4f}')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  points = [(r['step'], r[key]) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  return [s for s, _ in points], [v for _, v in points]


def save_curves_png(metrics_jsonl_path: str, path: str) -> None:
  """Loss (left) and accuracy (right) against step, one line per metric in the jsonl.

  Plots every numeric key whose last '/'-part is 'loss' or 'accuracy' (e.g. 'loss',
  'train/loss', 'eval/accuracy'), so it follows whatever names the trainer writes.
  """
  records = metrics_lib.read_file(metrics_jsonl_path)
  keys = sorted({k for r in records for k in r if k != 'step'})
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, kind in zip(axes, ('loss', 'accuracy')):
    for key in keys:
      if key.split('/')[-1] == kind:
        steps, values = _series(records, key)
        ax.plot(steps, values, label=key, marker='.' if len(steps) < 50 else None)
    ax.set_xlabel('step')
    ax.set_ylabel(kind)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
