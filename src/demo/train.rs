//! The demo's training stages: supervised fine-tuning on LLaVA conversation JSON (the language model on the
//! corpus, then the whole model on the grounded data), and preference training with LoRA on pair files (DPO,
//! or plain SFT on the chosen answers for the control row).
//!
//! STAND-IN: this is a minimal loop used until the project's trainer (`bpo sft` / `bpo train`, `src/train/`)
//! is merged; the stage functions keep their signatures and will call it instead. Files are what the trainer
//! writes: a model folder in llava-hf layout and `metrics.jsonl` with TRL's metric names.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::model::copy_model_files;
use super::world;
use crate::bootstrap::{read_pairs, Pair};
use crate::generate::Vlm;
use crate::model::config::ModelConfig;
use crate::model::load::{build, save_safetensors};
use crate::model::lora::{attach, LoraConfig};
use crate::model::{Inputs, LoadOptions, Model, Pass};
use crate::text::{PromptStyle, Template, Tokenizer};
use crate::vision::{AspectMode, ImageProcessor};
use crate::{bail, jsonl, Error, Result};

/// Supervised fine-tuning settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftSettings {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// Train only the language model, on plain text (the `plain` template: BOS, then the reply): pre-training
    /// on the text corpus.
    pub language_only: bool,
    /// Train the vision tower too (otherwise it stays as initialised: random features that the projector learns
    /// to read, which is what the project's trainer does).
    pub train_vision: bool,
}

/// Preference training settings (LoRA on every projection of the language model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefSettings {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub beta: f64,
    pub rank: usize,
    pub alpha: f64,
    /// Weight of the NLL-on-chosen term added to DPO (RPO); counteracts "say less".
    pub sft_weight: f64,
    /// No DPO term at all: supervised training on the chosen answers (the paper's control).
    pub chosen_only: bool,
}

/// One training sequence: ids, labels (-100 outside answers), image.
struct Example {
    ids: Vec<u32>,
    labels: Vec<i64>,
    image: Option<Tensor>,
}

#[derive(Deserialize)]
struct Conversation {
    #[serde(default)]
    image: Option<String>,
    conversations: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    value: String,
}

/// The ids of a conversation: the first human turn opens with the image, every answer ends with EOS and is the
/// only labelled part.
fn example(vlm: &Vlm, turns: &[(String, String)], image: Option<Tensor>) -> Result<Example> {
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    for (i, (q, a)) in turns.iter().enumerate() {
        let q = q.replace("<image>\n", "").replace("<image>", "");
        let p = if i == 0 { vlm.prompt_ids(&q, image.is_some())? } else { vlm.tok.encode(&vlm.template.render(&q, false))? };
        labels.extend(std::iter::repeat_n(crate::score::IGNORE, p.len()));
        ids.extend(p);
        let r = vlm.response_ids(a)?;
        labels.extend(r.iter().map(|&x| x as i64));
        ids.extend(r);
    }
    Ok(Example { ids, labels, image })
}

/// Summed answer log-probs and answer token counts of a batch.
fn forward(model: &Model, batch: &[&Example], pass: Pass) -> Result<(Tensor, Tensor)> {
    let t = batch.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let b = batch.len();
    let (mut ids, mut mask, mut labels) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    for e in batch {
        let pad = t - e.ids.len();
        ids.extend(e.ids.iter().copied().chain(std::iter::repeat_n(3, pad)));
        mask.extend(std::iter::repeat_n(1u32, e.ids.len()).chain(std::iter::repeat_n(0, pad)));
        labels.extend(e.labels.iter().copied().chain(std::iter::repeat_n(crate::score::IGNORE, pad)));
    }
    let images: Vec<Tensor> = batch.iter().filter_map(|e| e.image.clone()).collect();
    let images = if images.is_empty() { None } else { Some(Tensor::stack(&images, 0)?) };
    let dev = &model.device;
    let (ids, mask, labels) = (Tensor::from_vec(ids, (b, t), dev)?, Tensor::from_vec(mask, (b, t), dev)?, Tensor::from_vec(labels, (b, t), dev)?);
    let logits = model.forward(&Inputs { ids: &ids, mask: &mask, images: images.as_ref() }, None, pass)?;
    crate::score::sequence_logprobs(&logits, &labels)
}

/// Warm-up (5%) then cosine decay to 0.
fn lr_at(step: usize, total: usize, peak: f64) -> f64 {
    let warm = (total / 20).max(1);
    if step < warm {
        return peak * (step + 1) as f64 / warm as f64;
    }
    peak * 0.5 * (1.0 + (std::f64::consts::PI * (step - warm) as f64 / (total - warm).max(1) as f64).cos())
}

/// A model whose every weight is a trainable variable.
fn trainable(dir: &Path) -> Result<(Vlm, VarMap)> {
    let cfg = ModelConfig::from_dir(dir)?;
    let mut varmap = VarMap::new();
    let model = build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg, &LoadOptions::default())?;
    varmap.load(dir.join("model.safetensors"))?;
    let tok = Tokenizer::from_dir(dir, &model.llm.cfg.eos_ids())?;
    let processor = if model.vision.is_some() { Some(ImageProcessor::from_model_dir(dir)?) } else { None };
    Ok((Vlm { model, tok, processor, template: Template::LlavaHf, aspect: AspectMode::Pad, style: PromptStyle::Llava }, varmap))
}

/// Runs supervised training of `model_in` on LLaVA conversation JSON and writes the trained model folder to `out`
/// (plus `metrics.jsonl`). `tick` gets (step, loss).
pub fn sft(model_in: &Path, data: &Path, images: &Path, out: &Path, s: &SftSettings, seed: u64, mut tick: impl FnMut(usize, f64)) -> Result<()> {
    let (mut vlm, varmap) = trainable(model_in)?;
    if s.language_only {
        vlm.template = Template::Plain;
    }
    let text = std::fs::read_to_string(data).map_err(|e| Error::io(data, e))?;
    let convs: Vec<Conversation> = serde_json::from_str(&text).map_err(|e| Error::parse(data, None, e))?;
    let mut examples = Vec::with_capacity(convs.len());
    for c in &convs {
        let turns: Vec<(String, String)> = c.conversations.chunks(2).filter(|p| p.len() == 2).map(|p| (p[0].value.clone(), p[1].value.clone())).collect();
        let image = match &c.image {
            Some(rel) => Some(vlm.load_image(&images.join(rel))?),
            None => None,
        };
        examples.push(example(&vlm, &turns, image)?);
    }
    if examples.is_empty() {
        bail!("{}: no conversations", data.display());
    }
    let vars: Vec<Var> = {
        let data = varmap.data().lock().map_err(|_| Error::invalid("variable map poisoned"))?;
        let mut named: Vec<(&String, &Var)> = data.iter().filter(|(n, _)| if s.language_only { n.starts_with("language_model") } else { s.train_vision || !n.starts_with("vision_tower") }).collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named.into_iter().map(|(_, v)| v.clone()).collect()
    };
    let mut opt = candle_nn::AdamW::new(vars, candle_nn::ParamsAdamW { lr: s.lr, weight_decay: 0.0, ..Default::default() })?;
    let mut metrics = Vec::with_capacity(s.steps);
    let mut batches = Batches::new(examples.len(), s.batch, seed);
    for step in 0..s.steps {
        let batch: Vec<&Example> = batches.next().iter().map(|&i| &examples[i]).collect();
        opt.set_learning_rate(lr_at(step, s.steps, s.lr));
        let (sums, counts) = forward(&vlm.model, &batch, Pass { adapters: true, train: true })?;
        let loss = (sums.sum_all()?.neg()? / f64::from(counts.sum_all()?.to_scalar::<f32>()?.max(1.0)))?;
        opt.backward_step(&loss)?;
        let l = f64::from(loss.to_scalar::<f32>()?);
        metrics.push(serde_json::json!({"step": step, "loss": l, "lr": lr_at(step, s.steps, s.lr)}));
        tick(step, l);
    }
    copy_model_files(model_in, out)?;
    let data = varmap.data().lock().map_err(|_| Error::invalid("variable map poisoned"))?;
    let tensors: Vec<(String, Tensor)> = data.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    save_safetensors(&out.join("model.safetensors"), &tensors)?;
    jsonl::write(&out.join("metrics.jsonl"), &metrics)
}

/// Shuffled batches of indices, reshuffled each epoch.
struct Batches {
    order: Vec<usize>,
    pos: usize,
    batch: usize,
    rng: rand::rngs::StdRng,
}

impl Batches {
    fn new(n: usize, batch: usize, seed: u64) -> Self {
        let mut rng = world::rng(seed, 99);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        Batches { order, pos: 0, batch: batch.clamp(1, n.max(1)), rng }
    }
    fn next(&mut self) -> Vec<usize> {
        if self.pos + self.batch > self.order.len() {
            self.order.shuffle(&mut self.rng);
            self.pos = 0;
        }
        self.pos += self.batch;
        self.order[self.pos - self.batch..self.pos].to_vec()
    }
}

/// Preference training of LoRA adapters on `pairs` (bpo pair JSONL), reference = the model with adapters off.
/// Writes the merged model folder to `out` and `metrics.jsonl` (loss, rewards/chosen, rewards/rejected,
/// rewards/margins, rewards/accuracies). `tick` gets (step, loss).
pub fn preference(model_in: &Path, pairs: &Path, images: &Path, out: &Path, s: &PrefSettings, seed: u64, mut tick: impl FnMut(usize, f64)) -> Result<()> {
    let mut vlm = Vlm::load(model_in, &LoadOptions::default(), Template::LlavaHf)?;
    let pairs: Vec<Pair> = read_pairs(pairs)?;
    if pairs.is_empty() {
        bail!("no preference pairs to train on");
    }
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for p in &pairs {
        let image = match &p.image {
            Some(rel) => Some(vlm.load_image(&images.join(rel))?),
            None => None,
        };
        chosen.push(example(&vlm, &[(p.prompt.clone(), p.chosen.clone())], image.clone())?);
        rejected.push(example(&vlm, &[(p.prompt.clone(), p.rejected.clone())], image)?);
    }
    let (ref_c, ref_r) = (reference(&vlm.model, &chosen)?, reference(&vlm.model, &rejected)?);
    let lora = LoraConfig { rank: s.rank, alpha: s.alpha, dropout: 0.0, targets: ["q", "k", "v", "o", "gate", "up", "down"].map(String::from).to_vec() };
    let adapters = attach(&mut vlm.model, &lora, seed)?;
    let vars: Vec<Var> = adapters.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = candle_nn::AdamW::new(vars, candle_nn::ParamsAdamW { lr: s.lr, weight_decay: 0.0, ..Default::default() })?;
    let mut batches = Batches::new(pairs.len(), s.batch, seed);
    let mut metrics = Vec::with_capacity(s.steps);
    for step in 0..s.steps {
        let idx = batches.next();
        let n = idx.len();
        let rows: Vec<&Example> = idx.iter().map(|&i| &chosen[i]).chain(idx.iter().map(|&i| &rejected[i])).collect();
        opt.set_learning_rate(lr_at(step, s.steps, s.lr));
        let (sums, counts) = forward(&vlm.model, &rows, Pass { adapters: true, train: true })?;
        let (pc, pr) = (sums.narrow(0, 0, n)?, sums.narrow(0, n, n)?);
        let rc = Tensor::from_vec(idx.iter().map(|&i| ref_c[i]).collect::<Vec<f32>>(), n, &Device::Cpu)?;
        let rr = Tensor::from_vec(idx.iter().map(|&i| ref_r[i]).collect::<Vec<f32>>(), n, &Device::Cpu)?;
        let (rew_c, rew_r) = (((&pc - &rc)? * s.beta)?, ((&pr - &rr)? * s.beta)?);
        let margin = (&rew_c - &rew_r)?;
        let nll = (pc.sum_all()?.neg()? / f64::from(counts.narrow(0, 0, n)?.sum_all()?.to_scalar::<f32>()?.max(1.0)))?;
        let dpo = candle_nn::ops::sigmoid(&margin)?.log()?.neg()?.mean_all()?;
        let loss = if s.chosen_only { nll.clone() } else { (dpo + (&nll * s.sft_weight)?)? };
        opt.backward_step(&loss)?;
        let mean = |t: &Tensor| -> Result<f64> { Ok(f64::from(t.mean_all()?.to_scalar::<f32>()?)) };
        let acc = mean(&margin.gt(0f32)?.to_dtype(DType::F32)?)?;
        let l = f64::from(loss.to_scalar::<f32>()?);
        metrics.push(serde_json::json!({"step": step, "loss": l, "rewards/chosen": mean(&rew_c)?, "rewards/rejected": mean(&rew_r)?, "rewards/margins": mean(&margin)?, "rewards/accuracies": acc, "nll": mean(&nll)?, "lr": lr_at(step, s.steps, s.lr)}));
        tick(step, l);
    }
    copy_model_files(model_in, out)?;
    save_merged(model_in, &adapters, lora.alpha / lora.rank as f64, &out.join("model.safetensors"))?;
    jsonl::write(&out.join("metrics.jsonl"), &metrics)
}

/// Reference log-probs (adapters off), 64 rows at a time.
fn reference(model: &Model, examples: &[Example]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(64) {
        let rows: Vec<&Example> = chunk.iter().collect();
        out.extend(forward(model, &rows, Pass::BASE)?.0.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Writes the base weights of `model_in` with `scale * B A` added to every adapted linear.
fn save_merged(model_in: &Path, adapters: &[(String, Var)], scale: f64, path: &Path) -> Result<()> {
    let file = model_in.join("model.safetensors");
    let mut tensors: std::collections::HashMap<String, Tensor> = candle_core::safetensors::load(&file, &Device::Cpu)?;
    for pair in adapters.chunks(2) {
        let [(a_key, a), (_, b)] = pair else { continue };
        // base_model.model.<module>.lora_A.weight -> <module>.weight
        let module = a_key.trim_start_matches("base_model.model.").trim_end_matches(".lora_A.weight");
        let name = format!("{module}.weight");
        let Some(w) = tensors.get(&name) else { bail!("adapter {a_key} has no base weight {name}") };
        let delta = (b.as_tensor().matmul(a.as_tensor())? * scale)?;
        tensors.insert(name, (w + delta)?);
    }
    let mut list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    save_safetensors(path, &list)
}
