//! DPO-family losses (Rafailov et al. 2023 and successors) as pure functions of four summed log-probabilities per
//! pair: policy and reference, chosen and rejected. Formulas and names follow TRL's `DPOTrainer`, so a metrics file
//! reads the same as TRL's. [`mdpo_loss`] adds mDPO's image-side terms, which need two more: the chosen answer's
//! log-probability given a corrupted image, policy and reference.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::Result;

/// Which preference loss. With `d = (pc - rc) - (pr - rr)` (policy minus reference log-probs, chosen minus
/// rejected) and `b` = beta:
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// `-log sigmoid(b d)`: DPO as in the paper and in BPO's release.
    #[default]
    Sigmoid,
    /// `(d' - 1 / (2 b))^2` with `d'` the per-token (length-normalised) log-ratio difference (IPO, Azar et al. 2023;
    /// TRL normalises by length too).
    Ipo,
    /// `max(0, 1 - b d)` (SLiC).
    Hinge,
    /// Robust DPO (Chowdhury et al. 2024): labels flipped with probability `label_smoothing`;
    /// `((1 - e) l(d) - e l(-d)) / (1 - 2e)` with `l(x) = -log sigmoid(b x)`.
    Robust,
    /// `-log sigmoid(b d')`: sigmoid DPO on per-token log-ratios (TRL's `sigmoid_norm`).
    SigmoidNorm,
}

/// Loss settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoLoss {
    pub kind: LossKind,
    pub beta: f64,
    /// Flip probability of [`LossKind::Robust`], in [0, 0.5).
    pub label_smoothing: f64,
    /// Weight of an added SFT term, the NLL per token of the chosen answers (RPO, Pang et al. 2024; TRL's `sft`
    /// loss). 0 = off.
    pub sft_weight: f64,
}

impl Default for DpoLoss {
    fn default() -> Self {
        DpoLoss { kind: LossKind::Sigmoid, beta: 0.1, label_smoothing: 0.0, sft_weight: 0.0 }
    }
}

impl DpoLoss {
    /// Rejects settings with no meaning (beta <= 0, smoothing outside [0, 0.5), negative SFT weight).
    pub fn validate(&self) -> Result<()> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            crate::bail!("beta must be a finite number > 0, got {}", self.beta);
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            crate::bail!("label smoothing must lie in [0, 0.5), got {}", self.label_smoothing);
        }
        if !(self.sft_weight >= 0.0 && self.sft_weight.is_finite()) {
            crate::bail!("the SFT weight must be >= 0, got {}", self.sft_weight);
        }
        Ok(())
    }
}

/// Summed response log-probabilities of a batch of pairs, each (b,) f32, and the response lengths in tokens.
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub ref_chosen: Tensor,
    pub ref_rejected: Tensor,
    pub chosen_tokens: Tensor,
    pub rejected_tokens: Tensor,
}

/// The loss (a scalar, mean over pairs, plus the SFT term) and the implicit rewards `b (p - r)` per pair (detached).
pub struct DpoOutput {
    pub loss: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// `log sigmoid(x) = -log(exp(0) + exp(-x))`, shifted by the detached `m = max(0, -x)` like a log-sum-exp: stable
/// for any |x|, and its gradient is exactly `sigmoid(-x)` everywhere. (The textbook `-(relu(-x) + log1p(exp(-|x|)))`
/// has kinks whose subgradients candle picks inconsistently at x = 0, i.e. exactly when policy = reference.)
fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.neg()?.relu()?.detach();
    let sum = (m.neg()?.exp()? + (x.neg()? - &m)?.exp()?)?;
    (sum.log()? + m)?.neg()
}

/// The loss of [`DpoLoss`] for `lp`. Pure: no model, no state.
pub fn dpo_loss(lp: &PairLogps, cfg: &DpoLoss) -> Result<DpoOutput> {
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let (pc, pr, rc, rr) = (f(&lp.chosen)?, f(&lp.rejected)?, f(&lp.ref_chosen)?, f(&lp.ref_rejected)?);
    let (chosen_ratio, rejected_ratio) = ((&pc - rc)?, (&pr - rr)?);
    let delta = (&chosen_ratio - &rejected_ratio)?;
    let per_token = || -> candle_core::Result<Tensor> {
        let nc = f(&lp.chosen_tokens)?.clamp(1f32, f32::MAX)?;
        let nr = f(&lp.rejected_tokens)?.clamp(1f32, f32::MAX)?;
        (&chosen_ratio / nc)? - (&rejected_ratio / nr)?
    };
    let b = cfg.beta;
    let per_pair = match cfg.kind {
        LossKind::Sigmoid => log_sigmoid(&(&delta * b)?)?.neg()?,
        LossKind::Hinge => (1.0 - (&delta * b)?)?.relu()?,
        LossKind::Ipo => (per_token()? - 1.0 / (2.0 * b))?.sqr()?,
        LossKind::Robust => {
            let e = cfg.label_smoothing;
            let clean = (log_sigmoid(&(&delta * b)?)? * -(1.0 - e))?;
            let flipped = (log_sigmoid(&(&delta * -b)?)? * -e)?;
            ((clean - flipped)? / (1.0 - 2.0 * e))?
        }
        LossKind::SigmoidNorm => log_sigmoid(&(per_token()? * b)?)?.neg()?,
    };
    let mut loss = per_pair.mean_all()?;
    if cfg.sft_weight > 0.0 {
        let tokens = f(&lp.chosen_tokens)?.sum_all()?.clamp(1f32, f32::MAX)?;
        let nll = (pc.sum_all()?.neg()? / tokens)?;
        loss = (loss + (nll * cfg.sft_weight)?)?;
    }
    Ok(DpoOutput {
        loss,
        chosen_rewards: (chosen_ratio * b)?.detach(),
        rejected_rewards: (rejected_ratio * b)?.detach(),
    })
}

/// mDPO's image-side terms (Wang et al., EMNLP 2024, "mDPO: Conditional Preference Optimization for Multimodal
/// LLMs"), added to the DPO loss. With `r = pc - rc` the chosen answer's log-ratio given the true image and
/// `r' = pc' - rc'` the same answer's given a corrupted image:
/// - conditional: `-log sigmoid(b (r - r'))`: the answer given the true image is preferred over the same answer
///   given the corrupted one, so the preference cannot be won from the text alone;
/// - anchor: `-log sigmoid(b r - delta)`: the chosen answer's reward stays above `delta`, so DPO cannot win by
///   lowering both answers.
///
/// The loss is `dpo + conditional_weight * conditional + anchor_weight * anchor` (means over pairs). The released
/// trainer adds the three terms with weight 1 and no delta: the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MdpoLoss {
    pub conditional_weight: f64,
    pub anchor_weight: f64,
    /// The anchor's margin `delta` (mDPO: 0).
    pub anchor_delta: f64,
}

impl Default for MdpoLoss {
    fn default() -> Self {
        MdpoLoss { conditional_weight: 1.0, anchor_weight: 1.0, anchor_delta: 0.0 }
    }
}

impl MdpoLoss {
    /// Rejects negative or non-finite weights and a non-finite delta.
    pub fn validate(&self) -> Result<()> {
        for (what, w) in [("conditional", self.conditional_weight), ("anchor", self.anchor_weight)] {
            if !(w >= 0.0 && w.is_finite()) {
                crate::bail!("the mDPO {what} weight must be a finite number >= 0, got {w}");
            }
        }
        if !self.anchor_delta.is_finite() {
            crate::bail!("the mDPO anchor delta must be a finite number, got {}", self.anchor_delta);
        }
        Ok(())
    }
}

/// Summed log-probabilities of the chosen answers given the corrupted image, policy and reference, each (b,).
pub struct CorruptedLogps {
    pub chosen: Tensor,
    pub ref_chosen: Tensor,
}

/// The mDPO loss (a scalar), the DPO part's output (its `loss` is the DPO term alone, with its SFT term), each
/// image-side term unweighted (detached means) and the implicit rewards of the chosen answers given the corrupted
/// image `b (pc' - rc')` (detached).
pub struct MdpoOutput {
    pub loss: Tensor,
    pub dpo: DpoOutput,
    pub conditional: Tensor,
    pub anchor: Tensor,
    pub corrupted_rewards: Tensor,
}

/// The loss of [`MdpoLoss`] on top of [`dpo_loss`] with `cfg`. Pure: no model, no state.
pub fn mdpo_loss(lp: &PairLogps, corrupted: &CorruptedLogps, cfg: &DpoLoss, m: &MdpoLoss) -> Result<MdpoOutput> {
    let dpo = dpo_loss(lp, cfg)?;
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let chosen_ratio = (f(&lp.chosen)? - f(&lp.ref_chosen)?)?;
    let corrupted_ratio = (f(&corrupted.chosen)? - f(&corrupted.ref_chosen)?)?;
    let b = cfg.beta;
    let conditional = log_sigmoid(&((&chosen_ratio - &corrupted_ratio)? * b)?)?.neg()?.mean_all()?;
    let anchor = log_sigmoid(&((&chosen_ratio * b)? - m.anchor_delta)?)?.neg()?.mean_all()?;
    let loss = ((&dpo.loss + (&conditional * m.conditional_weight)?)? + (&anchor * m.anchor_weight)?)?;
    Ok(MdpoOutput {
        loss,
        dpo,
        conditional: conditional.detach(),
        anchor: anchor.detach(),
        corrupted_rewards: (corrupted_ratio * b)?.detach(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn logps(pc: &[f32], pr: &[f32], rc: &[f32], rr: &[f32]) -> PairLogps {
        PairLogps {
            chosen: t(pc),
            rejected: t(pr),
            ref_chosen: t(rc),
            ref_rejected: t(rr),
            chosen_tokens: t(&[4.0, 2.0]),
            rejected_tokens: t(&[5.0, 1.0]),
        }
    }

    fn scalar(x: &Tensor) -> f64 {
        x.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    fn loss_of(kind: LossKind, smoothing: f64, lp: &PairLogps) -> f64 {
        scalar(&dpo_loss(lp, &DpoLoss { kind, beta: 0.5, label_smoothing: smoothing, sft_weight: 0.0 }).unwrap().loss)
    }

    #[test]
    fn policy_equal_to_reference_gives_log_2_and_zero_rewards() {
        let lp = logps(&[-3.0, -7.5], &[-4.0, -1.25], &[-3.0, -7.5], &[-4.0, -1.25]);
        let out = dpo_loss(&lp, &DpoLoss::default()).unwrap();
        assert_eq!(out.loss.to_scalar::<f32>().unwrap(), std::f32::consts::LN_2);
        assert_eq!(out.chosen_rewards.to_vec1::<f32>().unwrap(), [0.0, 0.0]);
        assert_eq!(out.rejected_rewards.to_vec1::<f32>().unwrap(), [0.0, 0.0]);
    }

    #[test]
    fn every_kind_matches_its_formula() {
        // Pair 0: d = (-2 - -3) - (-6 - -4) = 3; pair 1: d = (-7 - -5) - (-1 - -2) = -3.
        let lp = logps(&[-2.0, -7.0], &[-6.0, -1.0], &[-3.0, -5.0], &[-4.0, -2.0]);
        let b = 0.5f64;
        let ls = |x: f64| -(1.0 + (-x).exp()).ln(); // log sigmoid
        let mean =
            |f: &dyn Fn(f64, f64) -> f64| (f(3.0, 1.0 / 4.0 + 2.0 / 5.0) + f(-3.0, -2.0 / 2.0 - 1.0 / 1.0)) / 2.0;
        let close = |a: f64, e: f64| assert!((a - e).abs() < 1e-5, "{a} vs {e}");
        close(loss_of(LossKind::Sigmoid, 0.0, &lp), mean(&|d, _| -ls(b * d)));
        close(loss_of(LossKind::Hinge, 0.0, &lp), mean(&|d, _| (1.0 - b * d).max(0.0)));
        close(loss_of(LossKind::Ipo, 0.0, &lp), mean(&|_, n| (n - 1.0 / (2.0 * b)).powi(2)));
        close(loss_of(LossKind::SigmoidNorm, 0.0, &lp), mean(&|_, n| -ls(b * n)));
        let e = 0.1;
        close(
            loss_of(LossKind::Robust, e, &lp),
            mean(&|d, _| (-(1.0 - e) * ls(b * d) + e * ls(-b * d)) / (1.0 - 2.0 * e)),
        );
        // Robust with no smoothing is plain sigmoid DPO.
        close(loss_of(LossKind::Robust, 0.0, &lp), loss_of(LossKind::Sigmoid, 0.0, &lp));
    }

    #[test]
    fn rewards_and_sft_term() {
        let lp = logps(&[-2.0, -7.0], &[-6.0, -1.0], &[-3.0, -5.0], &[-4.0, -2.0]);
        let cfg = DpoLoss { sft_weight: 0.5, ..Default::default() };
        let out = dpo_loss(&lp, &cfg).unwrap();
        let r: Vec<f32> = out.chosen_rewards.to_vec1().unwrap();
        assert!((r[0] - 0.1).abs() < 1e-6 && (r[1] + 0.2).abs() < 1e-6, "{r:?}");
        let plain = scalar(&dpo_loss(&lp, &DpoLoss::default()).unwrap().loss);
        // NLL per chosen token: (2 + 7) / (4 + 2).
        assert!((scalar(&out.loss) - plain - 0.5 * 9.0 / 6.0).abs() < 1e-5);
    }

    #[test]
    fn gradient_at_zero_margin_is_half_beta() {
        // At policy = reference, d loss / d chosen = -beta * sigmoid(0) / pairs.
        let pc = Var::from_tensor(&t(&[-3.0, -7.5])).unwrap();
        let lp = PairLogps {
            chosen: pc.as_tensor().clone(),
            ..logps(&[-3.0, -7.5], &[-4.0, -1.25], &[-3.0, -7.5], &[-4.0, -1.25])
        };
        let out = dpo_loss(&lp, &DpoLoss::default()).unwrap();
        let g: Vec<f32> = out.loss.backward().unwrap().get(pc.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(g, [-0.025, -0.025]);
    }

    #[test]
    fn large_margins_stay_finite_and_gradients_flow() {
        let pc = Var::from_tensor(&t(&[0.0, -500.0])).unwrap();
        let lp = PairLogps {
            chosen: pc.as_tensor().clone(),
            ..logps(&[0.0, 0.0], &[-900.0, 0.0], &[0.0, 0.0], &[0.0, 0.0])
        };
        let cfg = DpoLoss { beta: 1.0, ..Default::default() };
        let out = dpo_loss(&lp, &cfg).unwrap();
        let loss = scalar(&out.loss);
        assert!(loss.is_finite() && (loss - 250.0).abs() < 1e-3, "{loss}");
        let g: Vec<f32> = out.loss.backward().unwrap().get(pc.as_tensor()).unwrap().to_vec1().unwrap();
        assert!(g[0].abs() < 1e-6 && (g[1] + 0.5).abs() < 1e-6, "{g:?}");
    }

    fn corrupted(pc: &[f32], rc: &[f32]) -> CorruptedLogps {
        CorruptedLogps { chosen: t(pc), ref_chosen: t(rc) }
    }

    #[test]
    fn mdpo_at_policy_equal_to_reference_is_3_ln_2() {
        let lp = logps(&[-3.0, -7.5], &[-4.0, -1.25], &[-3.0, -7.5], &[-4.0, -1.25]);
        let out = mdpo_loss(&lp, &corrupted(&[-9.0, -2.0], &[-9.0, -2.0]), &DpoLoss::default(), &MdpoLoss::default())
            .unwrap();
        // Each term is exactly ln 2 in f32; their f32 sum is 3 ln 2 to rounding.
        assert!((scalar(&out.loss) - 3.0 * std::f64::consts::LN_2).abs() < 1e-6, "{}", scalar(&out.loss));
        let ln2 = f64::from(std::f32::consts::LN_2);
        assert_eq!((scalar(&out.conditional), scalar(&out.anchor)), (ln2, ln2));
        assert_eq!(out.corrupted_rewards.to_vec1::<f32>().unwrap(), [0.0, 0.0]);
    }

    #[test]
    fn mdpo_matches_the_papers_formula() {
        let lp = logps(&[-2.0, -7.0], &[-6.0, -1.0], &[-3.0, -5.0], &[-4.0, -2.0]);
        let side = corrupted(&[-4.0, -6.5], &[-3.5, -6.0]);
        let (b, e) = (0.5f64, 0.3f64);
        let m = MdpoLoss { conditional_weight: 0.7, anchor_weight: 1.3, anchor_delta: e };
        let cfg = DpoLoss { beta: b, ..Default::default() };
        let out = mdpo_loss(&lp, &side, &cfg, &m).unwrap();
        let ls = |x: f64| -(1.0 + (-x).exp()).ln();
        // Chosen log-ratios r = (1, -2), given the corrupted image r' = (-0.5, -0.5); DPO margins d = (3, -3).
        let (r, rc, d) = ([1.0, -2.0], [-0.5, -0.5], [3.0, -3.0]);
        let mean = |f: &dyn Fn(usize) -> f64| (f(0) + f(1)) / 2.0;
        let dpo = mean(&|i| -ls(b * d[i]));
        let cond = mean(&|i| -ls(b * (r[i] - rc[i])));
        let anchor = mean(&|i| -ls(b * r[i] - e));
        let close = |a: f64, want: f64| assert!((a - want).abs() < 1e-5, "{a} vs {want}");
        close(scalar(&out.dpo.loss), dpo);
        close(scalar(&out.conditional), cond);
        close(scalar(&out.anchor), anchor);
        close(scalar(&out.loss), dpo + 0.7 * cond + 1.3 * anchor);
        let rewards: Vec<f32> = out.corrupted_rewards.to_vec1().unwrap();
        assert!((rewards[0] + 0.25).abs() < 1e-6 && (rewards[1] + 0.25).abs() < 1e-6, "{rewards:?}");
    }

    /// The loss of `m` at the five log-prob vectors `x` = [pc, pr, rc, rr, pc'] (rc' fixed), and its gradient with
    /// respect to pc, pr and pc'.
    fn mdpo_at(x: &[Vec<f32>; 5], m: &MdpoLoss) -> (f64, [Vec<f32>; 3]) {
        let vars = [0, 1, 4].map(|i| Var::from_tensor(&t(&x[i])).unwrap());
        let lp = PairLogps {
            chosen: vars[0].as_tensor().clone(),
            rejected: vars[1].as_tensor().clone(),
            ..logps(&x[0], &x[1], &x[2], &x[3])
        };
        let side = CorruptedLogps { chosen: vars[2].as_tensor().clone(), ref_chosen: t(&[-3.5, -6.0]) };
        let out = mdpo_loss(&lp, &side, &DpoLoss { beta: 0.5, ..Default::default() }, m).unwrap();
        let grads = out.loss.backward().unwrap();
        // A weight of 0 cuts its term from the graph: no gradient is a zero gradient.
        let g = vars.map(|v| grads.get(v.as_tensor()).map_or(vec![0.0; 2], |g| g.to_vec1::<f32>().unwrap()));
        (scalar(&out.loss), g)
    }

    #[test]
    fn each_mdpo_terms_gradient_matches_finite_differences() {
        let x = [vec![-2.0, -7.0], vec![-6.0, -1.0], vec![-3.0, -5.0], vec![-4.0, -2.0], vec![-4.0, -6.5]];
        let none = MdpoLoss { conditional_weight: 0.0, anchor_weight: 0.0, anchor_delta: 0.2 };
        let terms = [
            ("dpo", none),
            ("conditional", MdpoLoss { conditional_weight: 1.0, ..none }),
            ("anchor", MdpoLoss { anchor_weight: 1.0, ..none }),
        ];
        let h = 1e-2f32;
        for (name, m) in terms {
            // Each image-side term alone: the loss with it minus the loss without it.
            let term = |x: &[Vec<f32>; 5]| {
                let (with, g) = mdpo_at(x, &m);
                let (without, g0) =
                    if name == "dpo" { (0.0, [0, 1, 2].map(|_| vec![0.0; 2])) } else { mdpo_at(x, &none) };
                (with - without, [0, 1, 2].map(|k| g[k].iter().zip(&g0[k]).map(|(a, b)| a - b).collect::<Vec<f32>>()))
            };
            let (_, grad) = term(&x);
            for (k, input) in [0usize, 1, 4].into_iter().enumerate() {
                for pair in 0..2 {
                    let (mut up, mut down) = (x.clone(), x.clone());
                    up[input][pair] += h;
                    down[input][pair] -= h;
                    let fd = (term(&up).0 - term(&down).0) / (2.0 * f64::from(h));
                    let got = f64::from(grad[k][pair]);
                    assert!(
                        (got - fd).abs() < 1e-3,
                        "{name}: d/d(input {input}, pair {pair}): autograd {got}, fd {fd}"
                    );
                }
            }
            // The conditional term pushes pc' down, the others ignore it; every term pulls pc up.
            let corrupted_grad = &grad[2];
            match name {
                "conditional" => assert!(corrupted_grad.iter().all(|&g| g > 0.0), "{corrupted_grad:?}"),
                _ => assert!(corrupted_grad.iter().all(|&g| g == 0.0), "{name}: {corrupted_grad:?}"),
            }
            assert!(grad[0].iter().all(|&g| g < 0.0), "{name}: {:?}", grad[0]);
        }
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert!(DpoLoss { beta: 0.0, ..Default::default() }.validate().is_err());
        assert!(DpoLoss { label_smoothing: 0.5, ..Default::default() }.validate().is_err());
        assert!(DpoLoss { sft_weight: -1.0, ..Default::default() }.validate().is_err());
        assert!(DpoLoss::default().validate().is_ok());
        assert!(MdpoLoss { anchor_weight: -1.0, ..Default::default() }.validate().is_err());
        assert!(MdpoLoss { conditional_weight: f64::NAN, ..Default::default() }.validate().is_err());
        assert!(MdpoLoss { anchor_delta: f64::INFINITY, ..Default::default() }.validate().is_err());
        assert!(MdpoLoss::default().validate().is_ok());
    }
}
