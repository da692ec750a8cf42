//! The training loss chart: an SVG path drawn from (step, loss) points, scaled to the view box.

/// The chart's view box; the SVG scales to its container.
pub const WIDTH: f64 = 600.0;
pub const HEIGHT: f64 = 200.0;
/// Room kept around the curve, in view-box units.
const PAD: f64 = 8.0;

/// The `d` attribute of a polyline through the points (x = step, y = loss, larger loss higher), and the
/// loss range it spans, or `None` with fewer than two points.
pub fn loss_path(points: &[(u32, f32)]) -> Option<(String, f32, f32)> {
    if points.len() < 2 {
        return None;
    }
    let first = f64::from(points[0].0);
    let last = f64::from(points[points.len() - 1].0);
    let (lo, hi) = points.iter().filter(|(_, loss)| loss.is_finite()).fold(
        (f32::INFINITY, f32::NEG_INFINITY),
        |(lo, hi), &(_, loss)| (lo.min(loss), hi.max(loss)),
    );
    if !lo.is_finite() {
        return None;
    }
    let x_span = (last - first).max(1.0);
    let y_span = f64::from(hi - lo).max(f64::EPSILON);
    let mut d = String::new();
    for &(step, loss) in points.iter().filter(|(_, loss)| loss.is_finite()) {
        let x = PAD + (f64::from(step) - first) / x_span * (WIDTH - 2.0 * PAD);
        let y = PAD + (1.0 - f64::from(loss - lo) / y_span) * (HEIGHT - 2.0 * PAD);
        let command = if d.is_empty() { 'M' } else { 'L' };
        d.push_str(&format!("{command}{x:.1},{y:.1} "));
    }
    Some((d.trim_end().to_owned(), lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_spans_the_box_with_high_loss_at_the_top() {
        let (d, lo, hi) = loss_path(&[(1, 2.0), (2, 1.0), (3, f32::NAN), (5, 0.5)]).unwrap();
        assert_eq!((lo, hi), (0.5, 2.0));
        assert_eq!(d, "M8.0,8.0 L154.0,130.7 L592.0,192.0");
        assert!(loss_path(&[(1, 1.0)]).is_none());
    }
}
