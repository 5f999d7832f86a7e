//! Rasterising scenes: each object is an analytic shape (inside test on its own centred coordinates), drawn with
//! 4x4 supersampling into its grid cell with a little jitter, on a dark background with per-pixel noise.

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, Normal};

use super::world::{Object, Scene, WorldConfig, COLOURS, GRID};

const BACKGROUND: [f64; 3] = [44.0, 46.0, 52.0];
const SUPERSAMPLE: usize = 4;

/// Is the point (x, y), in units of the object's radius and centred on it, inside shape `kind`?
pub fn inside(kind: usize, x: f64, y: f64) -> bool {
    let d = (x * x + y * y).sqrt();
    let (ax, ay) = (x.abs(), y.abs());
    match kind {
        0 => d < 1.0,                                                    // circle
        1 => d < 1.0 && d > 0.55,                                        // ring
        2 => ax.max(ay) < 0.8,                                           // square
        3 => ax + ay < 1.0,                                              // diamond
        4 => in_triangle(x, y, (0.0, -0.95), (-0.95, 0.8), (0.95, 0.8)), // triangle
        5 => (ay < 0.2 && x > -1.0 && x < 0.1) || in_triangle(x, y, (0.0, -0.75), (0.0, 0.75), (1.0, 0.0)), // arrow
        6 => ax.max(ay) < 0.85 && ((x - y).abs() < 0.38 || (x + y).abs() < 0.38), // cross
        7 => ax.max(ay) < 0.9 && (ax < 0.27 || ay < 0.27),               // plus
        8 => in_star(x, y),                                              // star
        9 => d < 0.5 || (d < 1.0 && (8.0 * y.atan2(x)).cos() > 0.55),    // sun
        10 => ax < 0.95 && ay < 0.32,                                    // bar
        11 => ax < 0.32 && ay < 0.95,                                    // pillar
        _ => false,
    }
}

fn in_triangle(x: f64, y: f64, a: (f64, f64), b: (f64, f64), c: (f64, f64)) -> bool {
    let side = |p: (f64, f64), q: (f64, f64)| (q.0 - p.0) * (y - p.1) - (q.1 - p.1) * (x - p.0);
    let (s1, s2, s3) = (side(a, b), side(b, c), side(c, a));
    (s1 >= 0.0 && s2 >= 0.0 && s3 >= 0.0) || (s1 <= 0.0 && s2 <= 0.0 && s3 <= 0.0)
}

/// A five-pointed star (outer radius 1, inner 0.45), point up.
fn in_star(x: f64, y: f64) -> bool {
    let pts: Vec<(f64, f64)> = (0..10)
        .map(|i| {
            let r = if i % 2 == 0 { 1.0 } else { 0.45 };
            let a = -std::f64::consts::FRAC_PI_2 + i as f64 * std::f64::consts::PI / 5.0;
            (r * a.cos(), r * a.sin())
        })
        .collect();
    // Even-odd rule over the polygon's edges.
    let mut inside = false;
    for i in 0..pts.len() {
        let (p, q) = (pts[i], pts[(i + 1) % pts.len()]);
        if (p.1 > y) != (q.1 > y) && x < (q.0 - p.0) * (y - p.1) / (q.1 - p.1) + p.0 {
            inside = !inside;
        }
    }
    inside
}

/// Where and how big an object is drawn, in pixels: centre and radius.
fn placement(o: &Object, size: usize, jitter: f64, rng: &mut StdRng) -> (f64, f64, f64) {
    let cell = size as f64 / GRID as f64;
    let r = cell * if o.big { 0.44 } else { 0.32 };
    let slack = (cell / 2.0 - r).max(0.0) * jitter.clamp(0.0, 1.0);
    let (row, col) = ((o.cell / GRID) as f64, (o.cell % GRID) as f64);
    let cx = (col + 0.5) * cell + rng.random_range(-slack..=slack);
    let cy = (row + 0.5) * cell + rng.random_range(-slack..=slack);
    (cx, cy, r)
}

/// How scenes look: image side, per-pixel noise std (grey levels), and how far objects wander from their cell's
/// centre (0 = centred, 1 = anywhere inside the cell).
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub size: usize,
    pub noise: f64,
    pub jitter: f64,
}

impl Style {
    /// How the images of a world are drawn.
    pub fn of(cfg: &WorldConfig) -> Self {
        Style { size: cfg.image_size, noise: cfg.pixel_noise, jitter: cfg.jitter }
    }
}

/// Renders `scene` as an RGB image.
pub fn render(scene: &Scene, style: Style, rng: &mut StdRng) -> RgbImage {
    let Style { size, noise, jitter } = style;
    let mut acc = vec![BACKGROUND; size * size];
    for o in &scene.objects {
        let (cx, cy, r) = placement(o, size, jitter, rng);
        let jitter: Vec<f64> = (0..3).map(|_| rng.random_range(-12.0..=12.0)).collect();
        let colour: Vec<f64> =
            COLOURS[o.colour].1.iter().zip(&jitter).map(|(&c, j)| (c as f64 + j).clamp(0.0, 255.0)).collect();
        let (x0, x1) = ((cx - r - 1.0).floor().max(0.0) as usize, ((cx + r + 1.0).ceil() as usize).min(size));
        let (y0, y1) = ((cy - r - 1.0).floor().max(0.0) as usize, ((cy + r + 1.0).ceil() as usize).min(size));
        for py in y0..y1 {
            for px in x0..x1 {
                let cover = coverage(o.kind, px, py, cx, cy, r);
                if cover > 0.0 {
                    let p = &mut acc[py * size + px];
                    for ch in 0..3 {
                        p[ch] = p[ch] * (1.0 - cover) + colour[ch] * cover;
                    }
                }
            }
        }
    }
    let normal = Normal::new(0.0, noise.max(0.0)).ok();
    let mut img = RgbImage::new(size as u32, size as u32);
    for (i, p) in acc.iter().enumerate() {
        let mut px = [0u8; 3];
        for ch in 0..3 {
            let n = normal.map_or(0.0, |d| d.sample(rng));
            px[ch] = (p[ch] + n).round().clamp(0.0, 255.0) as u8;
        }
        img.put_pixel((i % size) as u32, (i / size) as u32, Rgb(px));
    }
    img
}

/// Fraction of pixel (px, py) covered by the shape, from a 4x4 grid of samples.
fn coverage(kind: usize, px: usize, py: usize, cx: f64, cy: f64, r: f64) -> f64 {
    let mut hits = 0;
    for sy in 0..SUPERSAMPLE {
        for sx in 0..SUPERSAMPLE {
            let x = px as f64 + (sx as f64 + 0.5) / SUPERSAMPLE as f64;
            let y = py as f64 + (sy as f64 + 0.5) / SUPERSAMPLE as f64;
            hits += usize::from(inside(kind, (x - cx) / r, (y - cy) / r));
        }
    }
    hits as f64 / (SUPERSAMPLE * SUPERSAMPLE) as f64
}

/// Nearest-neighbour enlargement by an integer factor, for viewing small images in the report.
pub fn upscale(img: &RgbImage, factor: u32) -> RgbImage {
    let f = factor.max(1);
    RgbImage::from_fn(img.width() * f, img.height() * f, |x, y| *img.get_pixel(x / f, y / f))
}

#[cfg(test)]
mod tests {
    use super::super::world::{rng, KINDS};
    use super::*;

    /// Area of each shape on a fine grid, as a fraction of the unit square [-1, 1]^2.
    fn area(kind: usize) -> f64 {
        let n = 200;
        let mut hits = 0;
        for i in 0..n {
            for j in 0..n {
                let (x, y) = (-1.0 + 2.0 * (i as f64 + 0.5) / n as f64, -1.0 + 2.0 * (j as f64 + 0.5) / n as f64);
                hits += usize::from(inside(kind, x, y));
            }
        }
        hits as f64 / (n * n) as f64
    }

    #[test]
    fn every_kind_has_a_visible_distinct_shape() {
        let areas: Vec<f64> = (0..KINDS.len()).map(area).collect();
        for (k, a) in areas.iter().enumerate() {
            assert!(*a > 0.1 && *a < 0.8, "{} covers {a}", KINDS[k]);
        }
        // Partners differ in their masks even when their areas are close.
        for k in (0..KINDS.len()).step_by(2) {
            let n = 100;
            let mut differ = 0;
            for i in 0..n {
                for j in 0..n {
                    let (x, y) = (-1.0 + 2.0 * i as f64 / n as f64, -1.0 + 2.0 * j as f64 / n as f64);
                    differ += usize::from(inside(k, x, y) != inside(k + 1, x, y));
                }
            }
            assert!(differ > n * n / 20, "{} and {} look the same", KINDS[k], KINDS[k + 1]);
        }
    }

    #[test]
    fn rendering_is_seeded_and_paints_objects_in_their_cells() {
        let scene = Scene {
            objects: vec![
                Object { kind: 0, colour: 0, cell: 0, big: true },
                Object { kind: 2, colour: 2, cell: 8, big: true },
            ],
        };
        let style = Style { size: 48, noise: 4.0, jitter: 0.8 };
        let a = render(&scene, style, &mut rng(1, 0));
        assert_eq!(a, render(&scene, style, &mut rng(1, 0)));
        assert_ne!(a, render(&scene, style, &mut rng(2, 0)));
        // Red dominates the top-left cell's centre, blue the bottom-right one's, the middle is background.
        let p = a.get_pixel(8, 8);
        assert!(p[0] > 150 && p[2] < 120, "{p:?}");
        let q = a.get_pixel(40, 40);
        assert!(q[2] > 150 && q[0] < 120, "{q:?}");
        let m = a.get_pixel(24, 24);
        assert!(m[0] < 90 && m[1] < 90 && m[2] < 90, "{m:?}");
        assert_eq!(upscale(&a, 4).dimensions(), (192, 192));
    }
}
