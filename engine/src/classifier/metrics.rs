//! Quality figures for a binary classifier: accuracy, F1, the confusion matrix and calibration.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Calibration is read on the predicted label's confidence, which lies in [0.5, 1] for two
/// classes; ten bins of width 0.05 cover that range.
const BINS: usize = 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    pub lo: f32,
    pub hi: f32,
    pub count: usize,
    pub mean_confidence: f32,
    pub accuracy: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub count: usize,
    pub accuracy: f32,
    /// Rows are the true label, columns the predicted one, both in the order
    /// [image_request, conversation].
    pub confusion: [[usize; 2]; 2],
    pub precision_image: f32,
    pub recall_image: f32,
    pub f1_image: f32,
    pub f1_conversation: f32,
    pub f1_macro: f32,
    /// Expected calibration error: the count-weighted gap between confidence and accuracy.
    pub ece: f32,
    /// The same over the prompts predicted `image_request` only: whether "image, 0.9" is right
    /// 90% of the time.
    pub ece_image_request: f32,
    /// The same over the prompts predicted `conversation` only.
    pub ece_conversation: f32,
    /// Mean negative log-likelihood of the true label.
    pub log_loss: f32,
    pub bins: Vec<ReliabilityBin>,
}

fn ratio(a: usize, b: usize) -> f32 {
    if b == 0 {
        0.0
    } else {
        a as f32 / b as f32
    }
}

fn f1(precision: f32, recall: f32) -> f32 {
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
}

/// ECE of (count, confidence sum, correct) bins.
fn ece_of(bins: &[(usize, f64, usize)]) -> f32 {
    let n: usize = bins.iter().map(|b| b.0).sum();
    bins.iter()
        .filter(|b| b.0 > 0)
        .map(|&(count, conf_sum, correct)| {
            let gap = conf_sum / count as f64 - correct as f64 / count as f64;
            count as f64 / n as f64 * gap.abs()
        })
        .sum::<f64>() as f32
}

impl Metrics {
    /// `p_image[i]` is the predicted probability that example `i` is an image request and
    /// `targets[i]` is 1.0 when it is one.
    pub fn compute(p_image: &[f32], targets: &[f32]) -> Self {
        assert_eq!(p_image.len(), targets.len(), "one prediction per example");
        let mut confusion = [[0usize; 2]; 2];
        let mut sums = vec![(0usize, 0f64, 0usize); BINS];
        // The same bins for each predicted label: [image_request, conversation].
        let mut by_label = [
            vec![(0usize, 0f64, 0usize); BINS],
            vec![(0usize, 0f64, 0usize); BINS],
        ];
        let mut log_loss = 0f64;
        for (&p, &y) in p_image.iter().zip(targets) {
            let truth = usize::from(y < 0.5); // 0 = image_request, 1 = conversation
            let predicted = usize::from(p <= 0.5);
            confusion[truth][predicted] += 1;
            let confidence = if predicted == 0 { p } else { 1.0 - p };
            let bin = (((confidence - 0.5) * 2.0 * BINS as f32) as usize).min(BINS - 1);
            sums[bin].0 += 1;
            sums[bin].1 += f64::from(confidence);
            sums[bin].2 += usize::from(truth == predicted);
            let own = &mut by_label[predicted][bin];
            own.0 += 1;
            own.1 += f64::from(confidence);
            own.2 += usize::from(truth == predicted);
            let p_true = if truth == 0 { p } else { 1.0 - p };
            log_loss -= f64::from(p_true.max(1e-7)).ln();
        }
        let n = p_image.len();
        let [ece_image_request, ece_conversation] = by_label.map(|bins| ece_of(&bins));
        let mut ece = 0f64;
        let bins = sums
            .iter()
            .enumerate()
            .map(|(i, &(count, conf_sum, correct))| {
                let mean_confidence = if count == 0 {
                    0.0
                } else {
                    conf_sum / count as f64
                };
                let accuracy = ratio(correct, count);
                ece +=
                    count as f64 / n.max(1) as f64 * (mean_confidence - f64::from(accuracy)).abs();
                ReliabilityBin {
                    lo: 0.5 + i as f32 * 0.5 / BINS as f32,
                    hi: 0.5 + (i + 1) as f32 * 0.5 / BINS as f32,
                    count,
                    mean_confidence: mean_confidence as f32,
                    accuracy,
                }
            })
            .collect();
        let [[tp, fneg], [fp, tn]] = confusion;
        let precision_image = ratio(tp, tp + fp);
        let recall_image = ratio(tp, tp + fneg);
        let f1_image = f1(precision_image, recall_image);
        let f1_conversation = f1(ratio(tn, tn + fneg), ratio(tn, tn + fp));
        Self {
            count: n,
            accuracy: ratio(tp + tn, n),
            confusion,
            precision_image,
            recall_image,
            f1_image,
            f1_conversation,
            f1_macro: (f1_image + f1_conversation) / 2.0,
            ece: ece as f32,
            ece_image_request,
            ece_conversation,
            log_loss: (log_loss / n.max(1) as f64) as f32,
            bins,
        }
    }
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [[tp, fneg], [fp, tn]] = self.confusion;
        writeln!(f, "examples   {}", self.count)?;
        writeln!(f, "accuracy   {:.2}%", self.accuracy * 100.0)?;
        writeln!(
            f,
            "F1         image_request {:.4} (precision {:.4}, recall {:.4}), conversation {:.4}, macro {:.4}",
            self.f1_image, self.precision_image, self.recall_image, self.f1_conversation, self.f1_macro
        )?;
        writeln!(f, "confusion  (rows: true, columns: predicted)")?;
        writeln!(f, "                    image_request  conversation")?;
        writeln!(f, "  image_request     {tp:>13}  {fneg:>12}")?;
        writeln!(f, "  conversation      {fp:>13}  {tn:>12}")?;
        writeln!(
            f,
            "calibration ECE {:.4} (predicted image_request {:.4}, predicted conversation {:.4}), log loss {:.4}",
            self.ece, self.ece_image_request, self.ece_conversation, self.log_loss
        )?;
        writeln!(f, "  confidence      count  mean conf  accuracy")?;
        for b in self.bins.iter().filter(|b| b.count > 0) {
            writeln!(
                f,
                "  [{:.2}, {:.2})  {:>7}  {:>9.4}  {:>8.4}",
                b.lo, b.hi, b.count, b.mean_confidence, b.accuracy
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_scores_a_known_case() {
        // Two image requests (one missed) and two conversations (one false alarm).
        let m = Metrics::compute(&[0.9, 0.2, 0.6, 0.1], &[1.0, 1.0, 0.0, 0.0]);
        assert_eq!(m.confusion, [[1, 1], [1, 1]]);
        assert_eq!(m.accuracy, 0.5);
        assert_eq!(m.f1_image, 0.5);
        assert_eq!(m.f1_conversation, 0.5);
        // Confidences 0.9, 0.8, 0.6, 0.9 against correctness 1, 0, 0, 1: gaps 0.8 and 0.6 for
        // the two lone misses, 0.1 for the pair of hits at 0.9.
        let expected_ece = (0.25 * 0.8) + (0.25 * 0.6) + (0.5 * 0.1);
        assert!((m.ece - expected_ece).abs() < 1e-5, "ece {}", m.ece);
        // Predicted image: 0.9 right and 0.6 wrong, in two bins; predicted conversation: 0.8
        // wrong and 0.9 right.
        let image = 0.5 * 0.1 + 0.5 * 0.6;
        let conversation = 0.5 * 0.8 + 0.5 * 0.1;
        assert!((m.ece_image_request - image).abs() < 1e-5, "{m:?}");
        assert!((m.ece_conversation - conversation).abs() < 1e-5, "{m:?}");
        assert_eq!(m.bins.iter().map(|b| b.count).sum::<usize>(), 4);
    }

    #[test]
    fn perfect_confident_predictions_are_calibrated() {
        let m = Metrics::compute(&[1.0, 0.0], &[1.0, 0.0]);
        assert_eq!(m.accuracy, 1.0);
        assert!(m.ece < 1e-6);
        assert_eq!(m.f1_macro, 1.0);
    }
}
