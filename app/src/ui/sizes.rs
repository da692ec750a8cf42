//! Image size presets: an aspect ratio and a pixel budget, turned into a width and height the API accepts.

use crate::limits::{MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE};

/// (label, width:height) pairs offered in the settings.
pub const ASPECTS: [(&str, f64); 5] = [
    ("1:1", 1.0),
    ("4:3", 4.0 / 3.0),
    ("3:4", 3.0 / 4.0),
    ("16:9", 16.0 / 9.0),
    ("9:16", 9.0 / 16.0),
];

/// Sides of the square whose area each size preset keeps.
pub const SIDES: [u32; 4] = [256, 512, 768, 1024];

/// Width and height with about `side`² pixels at `aspect`, each a multiple of 16 within the API's bounds.
pub fn dimensions(aspect: f64, side: u32) -> (u32, u32) {
    let side = f64::from(side);
    let width = side * aspect.sqrt();
    let height = side / aspect.sqrt();
    (snap(width), snap(height))
}

fn snap(v: f64) -> u32 {
    let multiple = f64::from(SIZE_MULTIPLE);
    let snapped = ((v / multiple).round() * multiple) as u32;
    snapped.clamp(MIN_SIZE, MAX_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_valid_and_keep_the_aspect() {
        for (_, aspect) in ASPECTS {
            for side in SIDES {
                let (w, h) = dimensions(aspect, side);
                assert_eq!(w % SIZE_MULTIPLE, 0);
                assert_eq!(h % SIZE_MULTIPLE, 0);
                assert!((f64::from(w) / f64::from(h) - aspect).abs() / aspect < 0.05);
                let area = f64::from(w * h) / f64::from(side * side);
                assert!((0.9..1.1).contains(&area), "{w}x{h} for {side}");
            }
        }
        assert_eq!(dimensions(1.0, 1024), (1024, 1024));
        assert_eq!(dimensions(16.0 / 9.0, 1024), (1360, 768));
    }
}
