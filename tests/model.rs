//! Parity with Hugging Face transformers on tiny random-weight checkpoints (fixtures made by
//! `scripts/make_fixtures.py`): logits, greedy continuations and response log-probabilities.

use std::collections::HashMap;

use bpo::generate::{generate, EngineOptions, Request, SamplingParams};
use bpo::model::{load, Inputs, LoadOptions, Model, Pass};
use bpo::text::Tokenizer;
use candle_core::{DType, Device, IndexOp, Tensor};

use crate::util::fixture;

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).expect("reference tensors")
}

pub fn u32s(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// Largest |a - b| over positions where `mask` is 1. a, b: (b, t, v); mask: (b, t).
pub fn max_diff_where(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    (a - b).unwrap().abs().unwrap().broadcast_mul(&m).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn llava() -> Model {
    load(&fixture("llava-tiny"), &LoadOptions::default()).expect("llava-tiny loads")
}

#[test]
fn llava_logits_match_transformers() {
    let r = reference("llava-tiny-ref.safetensors");
    let model = llava();
    let (ids, mask) = (u32s(&r["input_ids"]), u32s(&r["attention_mask"]));
    let logits =
        model.forward(&Inputs { ids: &ids, mask: &mask, images: Some(&r["pixel_values"]) }, None, Pass::INFER).unwrap();
    let d = max_diff_where(&logits, &r["logits"], &r["attention_mask"]);
    assert!(d < 1e-4, "max |logit difference| {d}");
}

#[test]
fn llava_vision_features_match_transformers() {
    let r = reference("llava-tiny-ref.safetensors");
    let model = llava();
    let feats = model.project(&model.encode_images(&r["pixel_values"]).unwrap(), Pass::INFER).unwrap();
    let d = (feats - &r["image_features"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "max |feature difference| {d}");
}

#[test]
fn llama_with_llama3_rope_and_tied_head_matches_transformers() {
    let r = reference("llama-tiny-ref.safetensors");
    let model = load(&fixture("llama-tiny"), &LoadOptions::default()).unwrap();
    let (ids, mask) = (u32s(&r["input_ids"]), u32s(&r["attention_mask"]));
    let logits = model.forward(&Inputs { ids: &ids, mask: &mask, images: None }, None, Pass::INFER).unwrap();
    let d = max_diff_where(&logits, &r["logits"], &r["attention_mask"]);
    assert!(d < 1e-4, "max |logit difference| {d}");
}

pub fn greedy(
    model: &Model,
    tok: &Tokenizer,
    prompts: &Tensor,
    images: Option<&Tensor>,
    mask: Option<&Tensor>,
    n: usize,
) -> Vec<Vec<u32>> {
    let rows: Vec<Vec<u32>> = u32s(prompts).to_vec2().unwrap();
    let masks: Option<Vec<Vec<u32>>> = mask.map(|m| u32s(m).to_vec2().unwrap());
    let params = SamplingParams { max_new_tokens: n, ..Default::default() };
    let requests: Vec<Request> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            // Strip the fixture's own padding: the engine packs rows without any.
            let ids: Vec<u32> = match &masks {
                Some(m) => row.iter().zip(&m[i]).filter(|(_, &k)| k == 1).map(|(&id, _)| id).collect(),
                None => row.clone(),
            };
            Request { ids, image: images.map(|im| im.i(i).unwrap()), params: params.clone(), ..Default::default() }
        })
        .collect();
    // Fixtures were made with min_new_tokens = max_new_tokens: EOS must not stop them early here either.
    let mut tok_no_eos = Tokenizer::from_dir(&fixture("llava-tiny"), &[]).unwrap();
    tok_no_eos.eos.clear();
    let _ = tok;
    generate(model, &tok_no_eos, requests, &EngineOptions::default(), Pass::INFER)
        .unwrap()
        .into_iter()
        .map(|c| c.ids)
        .collect()
}

#[test]
fn llava_greedy_continuation_matches_transformers() {
    let r = reference("llava-tiny-ref.safetensors");
    let model = llava();
    let tok = Tokenizer::from_dir(&fixture("llava-tiny"), &[]).unwrap();
    let px = r["pixel_values"].i(0..1).unwrap();
    let got = greedy(&model, &tok, &r["greedy_prompt_ids"], Some(&px), None, 32);
    let want: Vec<Vec<u32>> = u32s(&r["greedy_ids"]).to_vec2().unwrap();
    assert_eq!(got, want);
}

#[test]
fn llava_batched_greedy_with_padding_matches_transformers() {
    let r = reference("llava-tiny-ref.safetensors");
    let model = llava();
    let tok = Tokenizer::from_dir(&fixture("llava-tiny"), &[]).unwrap();
    let want: Vec<Vec<u32>> = u32s(&r["greedy_batch_ids"]).to_vec2().unwrap();
    let got = greedy(
        &model,
        &tok,
        &r["greedy_batch_prompt_ids"],
        Some(&r["pixel_values"]),
        Some(&r["greedy_batch_attention_mask"]),
        want[0].len(),
    );
    assert_eq!(got, want);
}

#[test]
fn llama_greedy_continuation_matches_transformers() {
    let r = reference("llama-tiny-ref.safetensors");
    let model = load(&fixture("llama-tiny"), &LoadOptions::default()).unwrap();
    let tok = Tokenizer::from_dir(&fixture("llama-tiny"), &[]).unwrap();
    let got = greedy(&model, &tok, &r["greedy_prompt_ids"], None, None, 32);
    let want: Vec<Vec<u32>> = u32s(&r["greedy_ids"]).to_vec2().unwrap();
    assert_eq!(got, want);
}

#[test]
fn response_logprob_sums_match_transformers() {
    let r = reference("llava-tiny-ref.safetensors");
    let model = llava();
    let (ids, mask) = (u32s(&r["score_input_ids"]), u32s(&r["score_attention_mask"]));
    // Two rows carry images 0 and 1; the text-only row none.
    let logits =
        model.forward(&Inputs { ids: &ids, mask: &mask, images: Some(&r["pixel_values"]) }, None, Pass::INFER).unwrap();
    let (sums, counts) = bpo::score::sequence_logprobs(&logits, &r["score_labels"]).unwrap();
    let d = (sums - &r["score_sums"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-3, "max |log-prob sum difference| {d}");
    let want: Vec<f32> = r["score_counts"].to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    assert_eq!(counts.to_vec1::<f32>().unwrap(), want);
}

/// Backward of the labels' summed log-probs; every variable in `vars` must get a finite, non-zero gradient.
fn backward_reaches_every_var(
    logits: &Tensor,
    labels: &Tensor,
    vars: &[(String, candle_core::Var)],
) -> candle_core::backprop::GradStore {
    let (sums, _) = bpo::score::sequence_logprobs(logits, labels).unwrap();
    let grads = sums.sum_all().unwrap().backward().unwrap();
    for (name, v) in vars {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
    }
    grads
}

#[test]
fn full_fine_tuning_with_the_vision_tower_gives_every_weight_a_gradient() {
    let r = reference("llava-tiny-ref.safetensors");
    let (model, vars) =
        bpo::model::load::load_trainable(&fixture("llava-tiny"), &LoadOptions::default(), true).unwrap();
    let vision = vars.iter().filter(|(n, _)| n.starts_with(bpo::model::load::VISION_PREFIX)).count();
    // 3 layers, vision_feature_layer -2: 2 layers x 16 tensors, patch/class/position embeddings, pre-layernorm (2).
    assert_eq!(vision, 2 * 16 + 3 + 2, "vision variables");
    assert!(
        vars.iter().any(|(n, _)| n.starts_with("multi_modal_projector."))
            && vars.iter().any(|(n, _)| n.starts_with("language_model."))
    );
    let (ids, mask) = (u32s(&r["score_input_ids"]), u32s(&r["score_attention_mask"]));
    let inputs = Inputs { ids: &ids, mask: &mask, images: Some(&r["pixel_values"]) };
    let logits = model.forward(&inputs, None, Pass { adapters: true, train: true }).unwrap();
    // Loaded as variables, the model is the same model.
    let frozen = llava().forward(&inputs, None, Pass::INFER).unwrap();
    assert!(max_diff_where(&logits, &frozen, &r["score_attention_mask"]) < 1e-4);
    backward_reaches_every_var(&logits, &r["score_labels"], &vars);
}

#[test]
fn every_trainable_parameter_gets_a_gradient_and_frozen_weights_none() {
    use bpo::model::lora::{attach, unfreeze_projector, LoraConfig};
    let r = reference("llava-tiny-ref.safetensors");
    let mut model = llava();
    let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, ..Default::default() };
    let mut vars = attach(&mut model, &cfg, 0).unwrap();
    assert_eq!(vars.len(), 2 * 7 * 2, "A and B for 7 projections in 2 layers");
    // B starts at zero, which zeroes A's gradient: give B values so both must receive one.
    for (name, v) in &vars {
        if name.ends_with("lora_B.weight") {
            v.set(&(Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap())).unwrap();
        }
    }
    vars.extend(unfreeze_projector(&mut model).unwrap());
    let (ids, mask) = (u32s(&r["score_input_ids"]), u32s(&r["score_attention_mask"]));
    let inputs = Inputs { ids: &ids, mask: &mask, images: Some(&r["pixel_values"]) };
    let logits = model.forward(&inputs, None, Pass { adapters: true, train: true }).unwrap();
    let grads = backward_reaches_every_var(&logits, &r["score_labels"], &vars);
    // Frozen weights: no gradient buffers at all.
    assert!(grads.get(&model.llm.lm_head.weight).is_none(), "lm_head must not get a gradient");
    assert!(grads.get(&model.llm.embed_tokens).is_none(), "embeddings must not get a gradient");
    // With adapters off the model is the base model again (the DPO reference).
    let base = llava();
    let a = model.forward(&inputs, None, Pass::BASE).unwrap();
    let b = base.forward(&inputs, None, Pass::BASE).unwrap();
    assert!(max_diff_where(&a, &b, &r["score_attention_mask"]) < 1e-4, "adapters off must equal the base model");
}
