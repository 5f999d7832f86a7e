//! `bpo train`: DPO with LoRA on preference pairs. Also the options, the report of how a run ended and the SIGINT /
//! SIGTERM handling that `bpo sft` shares.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::{bail, Context};
use bpo::model::lora::LoraConfig;
use bpo::progress::Silent;
use bpo::train::dpo::{self, DpoConfig, MdpoConfig, DEFAULT_FEATURE_CACHE_MB};
use bpo::train::loss::MdpoLoss;
use bpo::train::trainer::LoopConfig;
use bpo::train::{DpoLoss, LossKind, ModelSetup, ScheduleKind, TrainReport};

use super::{bars, range, ModelArgs};

/// Options of the subcommand (its help text is on the `Command` variant).
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Preference data: BPO records (expanded to pairs as `bpo pairs` does) or a pair file (bpo, TRL
    /// conversational or plain strings, LLaMA-Factory rows).
    #[arg(long)]
    data: PathBuf,
    /// Folder the data's image paths are relative to.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Run folder to write (or to continue with --resume); locked while the run writes it (a second run on the
    /// same folder is refused, naming the first one's pid).
    #[arg(long)]
    out: PathBuf,
    /// DPO temperature, > 0: larger keeps the policy closer to the reference.
    #[arg(long, default_value_t = 0.1, value_parser = range::positive::<f64>)]
    beta: f64,
    /// Preference loss.
    #[arg(long, value_enum, default_value = "sigmoid")]
    loss: LossKind,
    /// Label-flip probability of the robust loss, in [0, 0.5).
    #[arg(long, default_value_t = 0.0, value_parser = range::below_half::<f64>)]
    label_smoothing: f64,
    /// Weight of an added NLL term on the chosen answers (RPO), >= 0; 0 = off.
    #[arg(long, default_value_t = 0.0, value_parser = range::non_negative::<f64>)]
    sft_weight: f64,
    /// Training objective: dpo, or mdpo (Wang et al. 2024): DPO plus an image-side pair (the chosen answer given the
    /// image preferred over the same answer given a corrupted image) and an anchor on the chosen answer's reward.
    #[arg(long, value_enum, default_value = "dpo")]
    objective: Objective,
    /// mdpo: weight of the image-side (conditional) term, >= 0 [default: 1, as mDPO's trainer].
    #[arg(long, value_parser = range::non_negative::<f64>)]
    mdpo_conditional_weight: Option<f64>,
    /// mdpo: weight of the anchor term, >= 0 [default: 1, as mDPO's trainer].
    #[arg(long, value_parser = range::non_negative::<f64>)]
    mdpo_anchor_weight: Option<f64>,
    /// mdpo: the anchor's margin delta: -log sigmoid(beta * chosen log-ratio - delta) [default: 0, as mDPO's trainer].
    #[arg(long, allow_negative_numbers = true)]
    mdpo_anchor_delta: Option<f64>,
    /// mdpo: diffusion step of the corrupted image in 0..=999, as `bpo distort --noise-step` makes it; the noise is
    /// seeded by --seed and the image, so a resumed run sees the same picture [default: 900].
    #[arg(long)]
    mdpo_noise_step: Option<usize>,
    /// Compute the reference log-probs once before training (cached in the run folder) instead of every step.
    #[arg(long)]
    precompute_ref: bool,
    /// Reference uses the live, training projector (BPO's released behaviour) instead of a frozen copy.
    #[arg(long)]
    drifting_ref_projector: bool,
    /// Records only: drop records with a response longer than this many words (0 = keep all).
    #[arg(long, default_value_t = 350)]
    max_words: usize,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `--objective` (of `bpo train` and `bpo bench train`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Objective {
    Dpo,
    Mdpo,
}

impl Args {
    /// The mDPO settings: None for plain DPO, whose run refuses the mdpo options.
    fn mdpo(&self) -> anyhow::Result<Option<MdpoConfig>> {
        let given = [
            ("--mdpo-conditional-weight", self.mdpo_conditional_weight.is_some()),
            ("--mdpo-anchor-weight", self.mdpo_anchor_weight.is_some()),
            ("--mdpo-anchor-delta", self.mdpo_anchor_delta.is_some()),
            ("--mdpo-noise-step", self.mdpo_noise_step.is_some()),
        ];
        if self.objective == Objective::Dpo {
            if let Some((name, _)) = given.iter().find(|g| g.1) {
                bail!("{name} is an option of --objective mdpo");
            }
            return Ok(None);
        }
        let d = MdpoConfig::default();
        Ok(Some(MdpoConfig {
            loss: MdpoLoss {
                conditional_weight: self.mdpo_conditional_weight.unwrap_or(d.loss.conditional_weight),
                anchor_weight: self.mdpo_anchor_weight.unwrap_or(d.loss.anchor_weight),
                anchor_delta: self.mdpo_anchor_delta.unwrap_or(d.loss.anchor_delta),
            },
            noise_step: self.mdpo_noise_step.unwrap_or(d.noise_step),
        }))
    }
}

/// What `bpo train` and `bpo sft` share: tokenisation, adapters, optimisation, run control.
#[derive(clap::Args, Clone)]
pub struct CommonArgs {
    /// Tokenisation conventions: llava (BOS, answers end with EOS: LLaVA's own trainer) or trl (no BOS/EOS,
    /// answers as " {text} ", and the model folder's chat template unless --template says otherwise: TRL's
    /// vision DPO).
    #[arg(long, value_enum, default_value = "llava")]
    pub prompt_style: bpo::text::PromptStyle,
    /// LoRA rank, at least 1.
    #[arg(long, default_value_t = 64, value_parser = range::at_least_one)]
    pub lora_rank: usize,
    /// LoRA scale numerator, > 0: updates are (alpha / rank) B A x.
    #[arg(long, default_value_t = 256.0, value_parser = range::positive::<f64>)]
    pub lora_alpha: f64,
    /// Dropout on the adapters' input, in [0, 1) (seeded: resumed runs replay it).
    #[arg(long, default_value_t = 0.05, value_parser = range::below_one::<f32>)]
    pub lora_dropout: f32,
    /// Language-model projections that get adapters.
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub lora_targets: Vec<String>,
    /// Train every language-model weight instead of LoRA adapters (the output is then a model folder).
    #[arg(long)]
    pub full: bool,
    /// Train the projector too (BPO does).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub train_projector: bool,
    /// Start from this PEFT adapter (a run folder or peft's save_pretrained output, either name spelling).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Peak learning rate, > 0 [default: 2e-6 for train, 2e-5 for sft].
    #[arg(long, value_parser = range::positive::<f64>)]
    pub lr: Option<f64>,
    /// Learning-rate schedule after the warm-up.
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: ScheduleKind,
    /// Fraction of the steps spent warming up linearly from 0, in [0, 1].
    #[arg(long, default_value_t = 0.03, value_parser = range::fraction::<f64>)]
    pub warmup_ratio: f64,
    /// AdamW decoupled weight decay, >= 0 (not applied to biases and norms).
    #[arg(long, default_value_t = 0.0, value_parser = range::non_negative::<f64>)]
    pub weight_decay: f64,
    /// Passes over the data, at least 1 [default: 2 for train, 1 for sft].
    #[arg(long, value_parser = range::at_least_one)]
    pub epochs: Option<usize>,
    /// Pairs (or conversations) per micro-batch, at least 1.
    #[arg(long, default_value_t = 4, value_parser = range::at_least_one)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step, at least 1.
    #[arg(long, default_value_t = 1, value_parser = range::at_least_one)]
    pub grad_accum: usize,
    /// Clip gradients to this global L2 norm, >= 0. 0 (like leaving it out) means no clipping, as TRL's and
    /// transformers' max_grad_norm=0.
    #[arg(long, value_parser = range::non_negative::<f64>)]
    pub max_grad_norm: Option<f64>,
    /// Positions per sequence, image positions included, at least 1; longer answers are cut (never image positions).
    #[arg(long, default_value_t = 2048, value_parser = range::at_least_one)]
    pub max_length: usize,
    /// Seed of the data order, LoRA initialisation and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every N optimizer steps, N at least 1.
    #[arg(long, value_parser = range::at_least_one)]
    pub save_steps: Option<usize>,
    /// Continue the run in --out from its newest checkpoint (same options required).
    #[arg(long)]
    pub resume: bool,
    /// Keep only each decoder layer's input during the forward pass and recompute the layer in the backward pass
    /// (transformers' gradient_checkpointing): activation memory of one layer instead of all, for about one more
    /// forward pass per step; the results are the same. A run may be resumed with it switched on or off.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Memory for cached vision-tower features, in MiB (the tower is frozen; 0 = encode every time).
    #[arg(long, default_value_t = DEFAULT_FEATURE_CACHE_MB)]
    pub feature_cache_mb: usize,
}

impl CommonArgs {
    /// The model side of the config.
    pub fn setup(&self, model: &ModelArgs) -> anyhow::Result<ModelSetup> {
        if !model.adapter.is_empty() {
            bail!("to start training from an adapter use --init-adapter (--adapter is for generate/score)");
        }
        if model.allow_non_finite {
            bail!("--allow-non-finite is for generate, score and eval: training needs finite weights");
        }
        let lora = LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: self.lora_targets.clone(),
        };
        Ok(ModelSetup {
            model: model.model.clone(),
            template: model.template(self.prompt_style),
            prompt_style: self.prompt_style,
            aspect: model.aspect,
            lora: (!self.full).then_some(lora),
            train_projector: self.train_projector,
            train_vision: false,
            init_adapter: self.init_adapter.clone(),
            gradient_checkpointing: self.gradient_checkpointing,
            runtime: model.runtime()?,
        })
    }

    pub fn optim(&self, lr: f64, epochs: usize) -> LoopConfig {
        LoopConfig {
            lr: self.lr.unwrap_or(lr),
            schedule: self.schedule,
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay,
            epochs: self.epochs.unwrap_or(epochs),
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            max_grad_norm: self.max_grad_norm,
            save_steps: self.save_steps,
            seed: self.seed,
        }
    }
}

/// Set by the SIGINT / SIGTERM handler; the loop checks it after each step.
pub static STOP: AtomicBool = AtomicBool::new(false);
/// The signal that set [`STOP`].
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signal: libc::c_int) {
    SIGNAL.store(signal, Ordering::SeqCst);
    STOP.store(true, Ordering::SeqCst);
    // A second Ctrl-C (or SIGTERM) kills the process the usual way.
    // SAFETY: `signal` is async-signal-safe.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
    }
}

/// Makes Ctrl-C (SIGINT) and SIGTERM (`docker stop`, Slurm, Kubernetes, `kill`) finish the current step and save
/// instead of killing the run.
pub fn catch_stop_signals() {
    // SAFETY: installs a handler that only stores to atomics and resets the disposition.
    unsafe {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            libc::signal(signal, on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
    }
}

/// The status of a run stopped by a signal: 128 + its number, as shells report it.
pub fn stopped() -> ExitCode {
    let signal = SIGNAL.load(Ordering::SeqCst);
    ExitCode::from(if signal == libc::SIGTERM { super::EXIT_TERMINATED } else { super::EXIT_INTERRUPTED })
}

/// Prints how a run ended; a run stopped by a signal (checkpoint saved) exits with status 128 + its number, as
/// shells report a signal: 130 for Ctrl-C, 143 for SIGTERM.
pub fn finish(report: &TrainReport, out: &std::path::Path) -> ExitCode {
    let s = &report.summary;
    if s.interrupted {
        let step = s.start_step + s.steps_done;
        errln!(
            "stopped after step {step} of {}: checkpoint-{step} saved in {}; continue with --resume",
            s.total_steps,
            out.display()
        );
        return stopped();
    }
    let loss = s.last.as_ref().and_then(|l| l.get("loss")).map(|l| format!(", last loss {l:.4}")).unwrap_or_default();
    errln!("trained {} steps{loss}; wrote {}", s.steps_done, out.display());
    ExitCode::SUCCESS
}

impl Args {
    /// The resolved options of the run.
    pub(super) fn config(&self) -> anyhow::Result<DpoConfig> {
        let a = self;
        Ok(DpoConfig {
            setup: a.common.setup(&a.model)?,
            data: a.data.clone(),
            images: a.images.clone(),
            max_words: (a.max_words > 0).then_some(a.max_words),
            max_length: a.common.max_length,
            loss: DpoLoss { kind: a.loss, beta: a.beta, label_smoothing: a.label_smoothing, sft_weight: a.sft_weight },
            mdpo: a.mdpo()?,
            drifting_ref_projector: a.drifting_ref_projector,
            precompute_ref: a.precompute_ref,
            feature_cache_mb: a.common.feature_cache_mb,
            optim: a.common.optim(2e-6, 2),
        })
    }
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let cfg = a.config()?;
    catch_stop_signals();
    let report = dpo::train(&cfg, &a.out, a.common.resume, Some(&STOP), &mut Silent, &bars())
        .with_context(|| format!("training into {}", a.out.display()))?;
    Ok(finish(&report, &a.out))
}
