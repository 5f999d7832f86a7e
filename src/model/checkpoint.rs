//! Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; transformers'
//! `gradient_checkpointing`): a stack of blocks (decoder layers, vision-tower layers) runs forward keeping only
//! each block's input, and the backward pass recomputes one block at a time from its saved input and
//! back-propagates through it, seeded with the gradient that arrived from the block above.
//!
//! candle has one backward pass per scalar, so a [`Tape`] drives it block by block: the loss's backward reaches the
//! top block's outputs, which the tape made variables ([`Tape::leaves`]); for each block, newest first, the block
//! runs again on variables holding its saved inputs and the scalar `sum(outputs * gradients)` is back-propagated,
//! which gives the block's weights and inputs exactly the gradients the whole graph would. Every gradient store goes
//! to a sink (the optimizer's accumulation), so weights used in several blocks add up their parts.
//!
//! A block must compute the same thing twice: LoRA dropout rewinds its seed counter to where the block started
//! ([`super::linear::DropoutSeed::rewind`]), so the recomputation draws the same masks.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;

/// A block's computation: inputs in, outputs out (the same number each time it runs).
pub type Block<'a> = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Vec<Tensor>> + 'a>;

/// A block as run in the forward pass: what to recompute, from which inputs.
struct Frame<'a> {
    /// Saved inputs: variables holding their values (so that the recomputation yields their gradients; a copy,
    /// since candle cannot make a variable of existing storage), or, for a stack's first block whose inputs carry no
    /// graph, the inputs themselves.
    inputs: Vec<Tensor>,
    run: Block<'a>,
}

/// Consecutive blocks whose first inputs may carry a graph (`origin`) and whose last outputs the rest of the
/// forward pass uses as variables (`leaves`).
#[derive(Default)]
struct Stack<'a> {
    frames: Vec<Frame<'a>>,
    origin: Vec<Tensor>,
    leaves: Vec<Var>,
}

/// The record of a checkpointed forward pass; see the module documentation.
#[derive(Default)]
pub struct Tape<'a> {
    stacks: Vec<Stack<'a>>,
    /// The newest stack still takes blocks (no [`Tape::leaves`] yet).
    open: bool,
}

impl<'a> Tape<'a> {
    pub fn new() -> Self {
        Tape::default()
    }

    /// Runs `run` on `inputs` keeping no graph inside it, records it, and returns its outputs (without graph). The
    /// first block after [`Tape::new`] or [`Tape::leaves`] starts a stack whose `inputs` may carry a graph (the
    /// embeddings, with the projector's); gradients reach it in [`Tape::backward`].
    pub fn checkpoint(&mut self, inputs: Vec<Tensor>, run: Block<'a>) -> Result<Vec<Tensor>> {
        if !self.open {
            self.stacks.push(Stack { origin: inputs.clone(), ..Default::default() });
            self.open = true;
        }
        let stack = self.stacks.last_mut().expect("a stack is open");
        // Inputs from the block below need gradients; the first block's only where its inputs carry a graph.
        let first = stack.frames.is_empty();
        let saved = inputs
            .iter()
            .map(|t| {
                if first && !t.track_op() {
                    Ok(t.clone())
                } else {
                    Ok(Var::from_tensor(&t.detach())?.as_tensor().clone())
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let outputs = run(&saved)?.iter().map(Tensor::detach).collect();
        stack.frames.push(Frame { inputs: saved, run });
        Ok(outputs)
    }

    /// Ends the current stack: its last outputs become variables that the rest of the forward pass uses (returned),
    /// so that the loss's backward pass yields their gradients.
    pub fn leaves(&mut self, outputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let vars = outputs.iter().map(|t| Var::from_tensor(&t.detach())).collect::<candle_core::Result<Vec<_>>>()?;
        let tensors = vars.iter().map(|v| v.as_tensor().clone()).collect();
        if let Some(stack) = self.stacks.last_mut().filter(|_| self.open) {
            stack.leaves = vars;
        }
        self.open = false;
        Ok(tensors)
    }

    /// Back-propagates through the recorded blocks, newest stack and newest block first, after `grads` (the loss's
    /// backward pass, already given to `sink`). Each block's gradient store goes to `sink`, then the store that
    /// reaches each stack's origin.
    pub fn backward(self, grads: GradStore, sink: &mut dyn FnMut(&GradStore) -> Result<()>) -> Result<()> {
        let mut store = Some(grads);
        for stack in self.stacks.into_iter().rev() {
            let Some(reached) = store.take() else { break };
            let mut g: Vec<Option<Tensor>> = stack.leaves.iter().map(|v| reached.get(v.as_tensor()).cloned()).collect();
            drop(reached);
            for frame in stack.frames.into_iter().rev() {
                if g.iter().all(Option::is_none) {
                    // Nothing below reaches the loss.
                    return Ok(());
                }
                let outputs = (frame.run)(&frame.inputs)?;
                let Some(grads) = through(&outputs, &g)? else { return Ok(()) };
                sink(&grads)?;
                g = frame.inputs.iter().map(|t| grads.get(t).cloned()).collect();
            }
            store = through(&stack.origin, &g)?;
            if let Some(s) = &store {
                sink(s)?;
            }
        }
        Ok(())
    }
}

/// The gradients of `sum_i sum(outputs[i] * grads[i])`: back-propagates `grads` from `outputs` through their graph.
/// Outputs without a graph or a gradient contribute nothing; None when none contributes.
fn through(outputs: &[Tensor], grads: &[Option<Tensor>]) -> Result<Option<GradStore>> {
    let mut total: Option<Tensor> = None;
    for (o, g) in outputs.iter().zip(grads) {
        let Some(g) = g.as_ref().filter(|_| o.track_op()) else { continue };
        // A gradient may carry the graph of its own computation (candle builds gradients with tracked ops): only
        // its values are wanted here.
        let part = (o * g.detach())?.sum_all()?.to_dtype(candle_core::DType::F32)?;
        total = Some(match total {
            Some(t) => (t + part)?,
            None => part,
        });
    }
    Ok(match total {
        Some(t) => Some(t.backward()?),
        None => None,
    })
}

/// Back-propagates `loss` and gives every gradient store to `sink`: one store without a tape, one per block with one.
pub fn backward(loss: &Tensor, tape: Option<Tape>, sink: &mut dyn FnMut(&GradStore) -> Result<()>) -> Result<()> {
    let grads = loss.backward()?;
    sink(&grads)?;
    match tape {
        Some(tape) => tape.backward(grads, sink),
        None => Ok(()),
    }
}
