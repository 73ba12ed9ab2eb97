//! LFM2 hybrid decoder ([Liquid AI, LFM2](https://www.liquid.ai/blog/liquid-foundation-models-v2-our-second-series-of-generative-ai-models)),
//! the language model of LFM2-VL.
//!
//! Each layer is `x + op(operator_norm(x))` then `h + ffn(ffn_norm(h))`, where `op` is either a
//! gated short convolution (`in_proj -> (B, C, x)`, `C * conv(B * x)` with a causal depthwise kernel
//! of `conv_L_cache` taps, `out_proj`) or grouped-query attention with per-head RMSNorm on q and k
//! before RoPE. The FFN is SwiGLU (`w2(silu(w1 x) * w3 x)`); `embedding_norm` follows the last layer
//! and the LM head is tied to `embed_tokens` unless the checkpoint has its own `lm_head`.
//!
//! The entry point takes input embeddings (so image features can be spliced in), a padding mask for
//! left-padded batches and a [`TextCache`] that lives outside the weights. Positions count only real
//! tokens of each row, and padded positions are zeroed before they enter a conv state and never
//! attended to, so a row's numbers do not depend on what it is batched with.

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::autograd;
use crate::model::config::{LayerKind, TextParams};
use crate::model::kernels::packed::Kernel;
use crate::model::linear::{Linear, LinearVisitor, WeightMatrix};
use crate::model::ops::{self, RmsNorm};

/// Per-row bookkeeping plus each layer's state: conv windows and attention keys/values.
#[derive(Debug, Clone)]
pub struct TextCache {
    layers: Vec<LayerCache>,
    /// Every token seen so far per row: `true` for real tokens, `false` for padding.
    key_mask: Vec<Vec<bool>>,
    /// Next RoPE position per row (the number of real tokens seen).
    next_pos: Vec<usize>,
}

#[derive(Debug, Clone)]
enum LayerCache {
    /// `[B, K-1, D]`: the last `K-1` gated inputs `B * x` of the convolution.
    Conv(Option<Tensor>),
    /// Keys and values of every token so far.
    Attention(Option<KvBuffer>),
}

/// Keys and values `[B, KVH, capacity, hd]` of which the first `len` positions are filled.
///
/// Decoding appends one position per step; writing into spare capacity instead of concatenating
/// avoids copying the whole history every step (44 MB per token after a tiled-image prompt at the
/// 450M shapes). Tensors that take part in autograd are concatenated instead, because the
/// in-place write records no backward pass.
#[derive(Debug, Clone)]
struct KvBuffer {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvBuffer {
    /// Appends `k, v [B, KVH, L, hd]` and returns views of everything stored.
    fn append(slot: &mut Option<KvBuffer>, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let l = k.dim(2)?;
        let Some(buf) = slot.as_mut() else {
            *slot = Some(KvBuffer {
                k: k.clone(),
                v: v.clone(),
                len: l,
            });
            return Ok((k, v));
        };
        let needed = buf.len + l;
        if k.track_op() || v.track_op() || buf.k.track_op() {
            let (pk, pv) = (buf.k.narrow(2, 0, buf.len)?, buf.v.narrow(2, 0, buf.len)?);
            buf.k = Tensor::cat(&[&pk, &k], 2)?;
            buf.v = Tensor::cat(&[&pv, &v], 2)?;
            buf.len = needed;
            return Ok((buf.k.clone(), buf.v.clone()));
        }
        if needed > buf.k.dim(2)? {
            // Grow geometrically so appends stay amortised O(1) per position.
            let capacity = (needed * 3 / 2).max(needed + 64);
            let grow = |old: &Tensor| -> Result<Tensor> {
                let (b, h, _, hd) = old.dims4()?;
                let fresh = Tensor::zeros((b, h, capacity, hd), old.dtype(), old.device())?;
                fresh.slice_set(&old.narrow(2, 0, buf.len)?.contiguous()?, 2, 0)?;
                Ok(fresh)
            };
            buf.k = grow(&buf.k)?;
            buf.v = grow(&buf.v)?;
        }
        buf.k.slice_set(&k.contiguous()?, 2, buf.len)?;
        buf.v.slice_set(&v.contiguous()?, 2, buf.len)?;
        buf.len = needed;
        Ok((buf.k.narrow(2, 0, needed)?, buf.v.narrow(2, 0, needed)?))
    }
}

impl TextCache {
    /// An empty cache for `batch` rows.
    pub(crate) fn new(cfg: &TextParams, batch: usize) -> Self {
        let layers = cfg
            .layer_kinds
            .iter()
            .map(|k| match k {
                LayerKind::Conv => LayerCache::Conv(None),
                LayerKind::Attention => LayerCache::Attention(None),
            })
            .collect();
        Self {
            layers,
            key_mask: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }

    pub(crate) fn batch_size(&self) -> usize {
        self.next_pos.len()
    }

    /// Tokens (real and padding) seen so far.
    pub(crate) fn seq_len(&self) -> usize {
        self.key_mask.first().map_or(0, Vec::len)
    }
}

/// Rotary embedding frequencies (`rope_theta`, full head dim, rotate-half layout).
#[derive(Debug, Clone)]
struct Rotary {
    inv_freq: Vec<f64>,
}

impl Rotary {
    fn new(cfg: &TextParams) -> Self {
        let hd = cfg.head_dim;
        let inv_freq = (0..hd / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        Self { inv_freq }
    }

    /// `cos, sin` of shape `[B, L, hd/2]` for per-row positions `[B][L]`.
    fn cos_sin(
        &self,
        positions: &[Vec<usize>],
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let b = positions.len();
        let l = positions.first().map_or(0, Vec::len);
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(b * l * half);
        let mut sin = Vec::with_capacity(b * l * half);
        for row in positions {
            for &p in row {
                for &f in &self.inv_freq {
                    // transformers computes the angle in f32; rounding it first keeps us aligned.
                    let angle = (p as f32 * f as f32) as f64;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, l, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (b, l, half), dev)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Applies RoPE to `x [B, H, L, hd]` with `cos/sin [B, L, hd/2]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        // candle's fused rope has no backward pass; this composite form does.
        let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
        let hd = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd - hd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        return x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?;
    }
    candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
}

/// What every layer of one forward call shares.
struct StepContext {
    cos: Tensor,
    sin: Tensor,
    /// Additive attention mask `[B, 1, 1, L, T]`, `None` when plain causal over a single row chunk
    /// with nothing to hide (decode of unpadded rows).
    attn_mask: Option<Tensor>,
    /// `[B, L, 1]` with 0 at padded positions, `None` when the chunk has no padding.
    pad_mask: Option<Tensor>,
}

impl StepContext {
    /// The context of the chunk's last `rows` positions (queries and conv inputs only; keys keep
    /// the whole chunk).
    fn tail(&self, rows: usize) -> Result<StepContext> {
        let l = self.cos.dim(1)?;
        let start = l.checked_sub(rows).ok_or_else(|| {
            candle_core::Error::Msg(format!("{rows} tail rows of a {l}-token chunk"))
        })?;
        Ok(StepContext {
            cos: self.cos.narrow(1, start, rows)?.contiguous()?,
            sin: self.sin.narrow(1, start, rows)?.contiguous()?,
            attn_mask: self
                .attn_mask
                .as_ref()
                .map(|m| m.narrow(3, start, rows))
                .transpose()?,
            pad_mask: self
                .pad_mask
                .as_ref()
                .map(|m| m.narrow(1, start, rows))
                .transpose()?,
        })
    }
}

/// Gated short convolution (`conv`).
#[derive(Debug, Clone)]
pub(crate) struct ShortConv {
    in_proj: Linear,
    out_proj: Linear,
    /// `K` taps, each `[D]`: tap `k` multiplies the input `K-1-k` steps back.
    taps: Vec<Tensor>,
    bias: Option<Tensor>,
    hidden: usize,
}

impl ShortConv {
    pub(crate) fn new(cfg: &TextParams, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let k = cfg.conv_kernel;
        let in_proj = Linear::load(d, 3 * d, cfg.conv_bias, vb.pp("in_proj"))?;
        let out_proj = Linear::load(d, d, cfg.conv_bias, vb.pp("out_proj"))?;
        // Depthwise Conv1d weight [D, 1, K] -> K taps of [D].
        let w = vb.pp("conv").get((d, 1, k), "weight")?.reshape((d, k))?;
        let w = w.t()?.contiguous()?;
        let taps = (0..k).map(|i| w.get(i)).collect::<Result<Vec<_>>>()?;
        let bias = if cfg.conv_bias {
            Some(vb.pp("conv").get(d, "bias")?)
        } else {
            None
        };
        Ok(Self {
            in_proj,
            out_proj,
            taps,
            bias,
            hidden: d,
        })
    }

    /// `x` holds the chunk's last `r_in` positions (all `chunk` of them, or at least
    /// `rows_out + K - 1`); returns the output of the last `rows_out` positions.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &StepContext,
        state: &mut Option<Tensor>,
        rows_out: usize,
        chunk: usize,
    ) -> Result<Tensor> {
        let r_in = x.dim(1)?;
        let k = self.taps.len();
        if r_in == chunk {
            let y = self.gated_conv(x, ctx, state)?;
            return self
                .out_proj
                .forward(&y.narrow(1, r_in - rows_out, rows_out)?);
        }
        // A tail of the chunk: the window before it lies inside the chunk, so the cached state is
        // not read, only replaced by the chunk's last K-1 inputs.
        if r_in + 1 < rows_out + k {
            candle_core::bail!("conv tail of {r_in} rows cannot give {rows_out} outputs")
        }
        let ctx = ctx.tail(r_in)?;
        let bcx = self.in_proj.forward(x)?;
        let gate_c = bcx.narrow(2, self.hidden, self.hidden)?;
        let mut bx =
            (bcx.narrow(2, 0, self.hidden)? * bcx.narrow(2, 2 * self.hidden, self.hidden)?)?;
        if let Some(mask) = &ctx.pad_mask {
            bx = bx.broadcast_mul(mask)?;
        }
        let first = r_in - rows_out;
        let mut conv = bx
            .narrow(1, first + 1 - k, rows_out)?
            .broadcast_mul(&self.taps[0])?;
        for (i, tap) in self.taps.iter().enumerate().skip(1) {
            conv = (conv
                + bx.narrow(1, first + 1 - k + i, rows_out)?
                    .broadcast_mul(tap)?)?;
        }
        if let Some(bias) = &self.bias {
            conv = conv.broadcast_add(bias)?;
        }
        if k > 1 {
            *state = Some(bx.narrow(1, r_in + 1 - k, k - 1)?.contiguous()?);
        }
        let y = (gate_c.narrow(1, first, rows_out)? * conv)?;
        self.out_proj.forward(&y)
    }

    /// The gated convolution of a whole chunk (before `out_proj`), advancing `state`.
    fn gated_conv(
        &self,
        x: &Tensor,
        ctx: &StepContext,
        state: &mut Option<Tensor>,
    ) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let k = self.taps.len();
        // [B, L, 3D] split into B, C, x along the features.
        let bcx = self.in_proj.forward(x)?;
        if state.is_none()
            && bcx.track_op()
            && l + 1 >= k
            && let Some(y) =
                autograd::short_conv(&bcx, ctx.pad_mask.as_ref(), &self.taps, self.bias.as_ref())?
        {
            // Training: one fused op with its own backward; the state (which a training
            // forward never reads again) is the detached window.
            if k > 1 {
                let tail = bcx.narrow(1, l + 1 - k, k - 1)?.detach();
                let mut bx = (tail.narrow(2, 0, self.hidden)?
                    * tail.narrow(2, 2 * self.hidden, self.hidden)?)?;
                if let Some(mask) = &ctx.pad_mask {
                    bx = bx.broadcast_mul(&mask.narrow(1, l + 1 - k, k - 1)?)?;
                }
                *state = Some(bx.contiguous()?);
            }
            return Ok(y);
        }
        let gate_b = bcx.narrow(2, 0, self.hidden)?;
        let gate_c = bcx.narrow(2, self.hidden, self.hidden)?;
        let xs = bcx.narrow(2, 2 * self.hidden, self.hidden)?;
        let mut bx = (gate_b * xs)?;
        if let Some(mask) = &ctx.pad_mask {
            // Padding must not enter the rolling window (transformers' apply_mask_to_padding_states).
            bx = bx.broadcast_mul(mask)?;
        }
        // [B, K-1 + L, D]: the previous window, then this chunk.
        let padded = if k > 1 {
            let past = match state.as_ref() {
                Some(s) => s.clone(),
                None => Tensor::zeros((b, k - 1, d), bx.dtype(), bx.device())?,
            };
            Tensor::cat(&[&past, &bx], 1)?
        } else {
            bx.clone()
        };
        let mut conv = padded.narrow(1, 0, l)?.broadcast_mul(&self.taps[0])?;
        for (i, tap) in self.taps.iter().enumerate().skip(1) {
            conv = (conv + padded.narrow(1, i, l)?.broadcast_mul(tap)?)?;
        }
        if let Some(bias) = &self.bias {
            conv = conv.broadcast_add(bias)?;
        }
        if k > 1 {
            *state = Some(padded.narrow(1, l, k - 1)?.contiguous()?);
        }
        gate_c * conv
    }
}

/// Grouped-query attention with QK RMSNorm and RoPE (`self_attn`).
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    q_layernorm: RmsNorm,
    k_layernorm: RmsNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub(crate) fn new(cfg: &TextParams, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let hd = cfg.head_dim;
        Ok(Self {
            q_proj: Linear::load(d, cfg.num_heads * hd, false, vb.pp("q_proj"))?,
            k_proj: Linear::load(d, cfg.num_kv_heads * hd, false, vb.pp("k_proj"))?,
            v_proj: Linear::load(d, cfg.num_kv_heads * hd, false, vb.pp("v_proj"))?,
            out_proj: Linear::load(cfg.num_heads * hd, d, false, vb.pp("out_proj"))?,
            q_layernorm: RmsNorm::load(hd, cfg.norm_eps, vb.pp("q_layernorm"))?,
            k_layernorm: RmsNorm::load(hd, cfg.norm_eps, vb.pp("k_layernorm"))?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
        })
    }

    /// `x` is the whole chunk (every position's key and value enter the cache); queries are only
    /// computed for the last `rows_out` positions.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &StepContext,
        kv: &mut Option<KvBuffer>,
        rows_out: usize,
    ) -> Result<Tensor> {
        let (b, chunk, _) = x.dims3()?;
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let tail_ctx;
        let (q_in, q_ctx) = if rows_out == chunk {
            (x.clone(), ctx)
        } else {
            tail_ctx = ctx.tail(rows_out)?;
            (x.narrow(1, chunk - rows_out, rows_out)?, &tail_ctx)
        };
        let l = rows_out;
        // [B, L, H*hd] -> [B, L, H, hd] -> norm per head
        let q = self.q_proj.forward(&q_in)?.reshape((b, l, h, hd))?;
        let q = self.q_layernorm.forward(&q)?;
        let k = self.k_proj.forward(x)?.reshape((b, chunk, kvh, hd))?;
        let k = self.k_layernorm.forward(&k)?;
        let v = self.v_proj.forward(x)?;
        if kv.is_none()
            && let Some(o) = autograd::attention(
                &q.reshape((b, l, h * hd))?,
                &k.reshape((b, chunk, kvh * hd))?,
                &v,
                &ctx.cos,
                &ctx.sin,
                q_ctx.attn_mask.as_ref(),
                h,
                kvh,
                (hd as f64).powf(-0.5),
            )?
        {
            // Training: RoPE, both products, the mask and the softmax as one op with its own
            // backward; the cache (which a training forward never reads again) gets the detached
            // keys and values.
            let k = k.detach().transpose(1, 2)?.contiguous()?;
            let k = apply_rope(&k, &ctx.cos, &ctx.sin)?;
            let v = v.detach().reshape((b, chunk, kvh, hd))?.transpose(1, 2)?;
            KvBuffer::append(kv, k, v.contiguous()?)?;
            return self.out_proj.forward(&o);
        }
        // [B, L, H, hd] -> [B, H, L, hd]
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v
            .reshape((b, chunk, kvh, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = apply_rope(&q, &q_ctx.cos, &q_ctx.sin)?;
        let k = apply_rope(&k, &ctx.cos, &ctx.sin)?;
        let (k, v) = KvBuffer::append(kv, k, v)?;
        if q_ctx.attn_mask.is_none()
            && let Some(o) = ops::attention_step(&q, &k, &v, (hd as f64).powf(-0.5))?
        {
            // A decode step: one query row, nothing masked, read in place from the cache.
            return self.out_proj.forward(&o.reshape((b, l, h * hd))?);
        }
        let t = k.dim(2)?;
        let groups = h / kvh;
        // Query heads h use key/value head h / groups, so [B, H, L, hd] regroups without copying
        // keys: [B, KVH, G*L, hd] against [B, KVH, T, hd].
        let q = (q * (hd as f64).powf(-0.5))?.reshape((b, kvh, groups * l, hd))?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match &q_ctx.attn_mask {
            Some(mask) => scores
                .reshape((b, kvh, groups, l, t))?
                .broadcast_add(mask)?
                .reshape((b, kvh, groups * l, t))?,
            None => scores,
        };
        let probs = ops::softmax_last_dim(&scores)?;
        // [B, KVH, G*L, hd] -> [B, H, L, hd] -> [B, L, H*hd]
        let o = probs
            .matmul(&v)?
            .reshape((b, h, l, hd))?
            .transpose(1, 2)?
            .reshape((b, l, h * hd))?;
        self.out_proj.forward(&o)
    }
}

/// SwiGLU FFN (`feed_forward`).
#[derive(Debug, Clone)]
pub(crate) struct FeedForward {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl FeedForward {
    pub(crate) fn new(cfg: &TextParams, vb: VarBuilder) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.ffn_dim);
        Ok(Self {
            w1: Linear::load(d, f, false, vb.pp("w1"))?,
            w2: Linear::load(f, d, false, vb.pp("w2"))?,
            w3: Linear::load(d, f, false, vb.pp("w3"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = ops::swiglu(&self.w1.forward(x)?, &self.w3.forward(x)?)?;
        self.w2.forward(&gated)
    }
}

/// The operator of one decoder layer.
#[derive(Debug, Clone)]
pub(crate) enum Operator {
    Conv(ShortConv),
    Attention(Attention),
}

/// One LFM2 decoder layer.
#[derive(Debug, Clone)]
pub(crate) struct DecoderLayer {
    operator_norm: RmsNorm,
    operator: Operator,
    ffn_norm: RmsNorm,
    feed_forward: FeedForward,
}

impl DecoderLayer {
    pub(crate) fn new(cfg: &TextParams, kind: LayerKind, vb: VarBuilder) -> Result<Self> {
        let operator = match kind {
            LayerKind::Conv => Operator::Conv(ShortConv::new(cfg, vb.pp("conv"))?),
            LayerKind::Attention => Operator::Attention(Attention::new(cfg, vb.pp("self_attn"))?),
        };
        Ok(Self {
            operator_norm: RmsNorm::load(cfg.hidden_size, cfg.norm_eps, vb.pp("operator_norm"))?,
            operator,
            ffn_norm: RmsNorm::load(cfg.hidden_size, cfg.norm_eps, vb.pp("ffn_norm"))?,
            feed_forward: FeedForward::new(cfg, vb.pp("feed_forward"))?,
        })
    }

    /// `x` holds the last positions of a `chunk`-token chunk that this layer needs (see
    /// [`DecoderLayer::input_rows`]); returns the layer output of the last `rows_out` positions.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &StepContext,
        cache: &mut LayerCache,
        rows_out: usize,
        chunk: usize,
    ) -> Result<Tensor> {
        let normed = self.operator_norm.forward(x)?;
        let h = match (&self.operator, cache) {
            (Operator::Conv(conv), LayerCache::Conv(state)) => {
                conv.forward(&normed, ctx, state, rows_out, chunk)?
            }
            (Operator::Attention(attn), LayerCache::Attention(kv)) => {
                attn.forward(&normed, ctx, kv, rows_out)?
            }
            _ => candle_core::bail!("text cache does not match the layer types of this model"),
        };
        let r_in = x.dim(1)?;
        let h = (h + x.narrow(1, r_in - rows_out, rows_out)?)?;
        let f = self.feed_forward.forward(&self.ffn_norm.forward(&h)?)?;
        h + f
    }

    /// How many of a `chunk`-token chunk's last positions this layer reads to produce its output
    /// for the last `rows_out`: a convolution looks `K - 1` positions back, attention needs every
    /// position's key and value.
    fn input_rows(&self, rows_out: usize, chunk: usize) -> usize {
        match &self.operator {
            Operator::Conv(conv) => (rows_out + conv.taps.len().saturating_sub(1)).min(chunk),
            Operator::Attention(_) => chunk,
        }
    }

    fn visit(&self, f: &mut dyn FnMut(&Linear)) {
        match &self.operator {
            Operator::Conv(c) => {
                f(&c.in_proj);
                f(&c.out_proj);
            }
            Operator::Attention(a) => {
                f(&a.q_proj);
                f(&a.k_proj);
                f(&a.v_proj);
                f(&a.out_proj);
            }
        }
        f(&self.feed_forward.w1);
        f(&self.feed_forward.w3);
        f(&self.feed_forward.w2);
    }

    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        match &mut self.operator {
            Operator::Conv(c) => {
                f(&mut c.in_proj);
                f(&mut c.out_proj);
            }
            Operator::Attention(a) => {
                f(&mut a.q_proj);
                f(&mut a.k_proj);
                f(&mut a.v_proj);
                f(&mut a.out_proj);
            }
        }
        f(&mut self.feed_forward.w1);
        f(&mut self.feed_forward.w3);
        f(&mut self.feed_forward.w2);
    }
}

/// The LFM2 decoder (`language_model`) with its tied or separate LM head.
#[derive(Debug, Clone)]
pub struct TextModel {
    /// `[vocab, D]`; when tied and packed, the LM head's panels, from which rows are gathered.
    embed_tokens: WeightMatrix,
    layers: Vec<DecoderLayer>,
    embedding_norm: RmsNorm,
    /// `[vocab, D]`; the embedding matrix itself when tied.
    lm_head: WeightMatrix,
    /// `lm_head` is `embed_tokens`.
    tied: bool,
    dtype: DType,
    device: Device,
    rotary: Rotary,
    cfg: TextParams,
}

impl TextModel {
    /// `vb` points at `language_model`; `lm_head` is `Some` when the checkpoint has an untied head.
    pub(crate) fn new(cfg: &TextParams, vb: VarBuilder, lm_head: Option<Tensor>) -> Result<Self> {
        let embed_tokens = vb
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let vb_layers = vb.pp("layers");
        let layers = cfg
            .layer_kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| DecoderLayer::new(cfg, kind, vb_layers.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let embedding_norm = RmsNorm::load(cfg.hidden_size, cfg.norm_eps, vb.pp("embedding_norm"))?;
        let tied = lm_head.is_none();
        let lm_head = lm_head.unwrap_or_else(|| embed_tokens.clone());
        Ok(Self {
            dtype: embed_tokens.dtype(),
            device: embed_tokens.device().clone(),
            embed_tokens: WeightMatrix::Dense(embed_tokens),
            layers,
            embedding_norm,
            lm_head: WeightMatrix::Dense(lm_head),
            tied,
            rotary: Rotary::new(cfg),
            cfg: cfg.clone(),
        })
    }

    /// Packs a CPU f32 LM head for `kernel` (inference, and training, whose differentiable
    /// product reads it packed both ways);
    /// a tied embedding table then reads its rows from the packed head instead of keeping its
    /// own copy. Returns whether it packed.
    pub(crate) fn pack_head_for_cpu(&mut self, kernel: Kernel) -> Result<bool> {
        let packed = self.lm_head.pack_for_cpu(kernel)?;
        if packed && self.tied {
            self.embed_tokens = self.lm_head.clone();
        }
        Ok(packed)
    }

    /// The LM head's matrix (for [`crate::model::quant`]).
    pub(crate) fn lm_head_matrix(&self) -> &WeightMatrix {
        &self.lm_head
    }

    /// Replaces the LM head's matrix (quantizing at load); a tied embedding table then reads its
    /// rows from the new head, as after packing.
    pub(crate) fn set_lm_head_matrix(&mut self, head: WeightMatrix) {
        if self.tied {
            self.embed_tokens = head.clone();
        }
        self.lm_head = head;
    }

    /// Rows of the embedding matrix: every id below this is valid input, even past the tokenizer.
    pub fn embedding_rows(&self) -> usize {
        self.embed_tokens.out_dim()
    }

    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// `ids [B, L]` (any integer dtype) -> `[B, L, D]`.
    pub(crate) fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let ids = ids.to_dtype(DType::U32)?.flatten_all()?;
        let rows = self.embedding_rows() as u32;
        let id_list = ids.to_vec1::<u32>()?;
        if let Some(bad) = id_list.iter().find(|&&id| id >= rows) {
            candle_core::bail!("token id {bad} is outside the embedding table of {rows} rows")
        }
        let d = self.cfg.hidden_size;
        // [B*L, D] -> [B, L, D]
        match &self.embed_tokens {
            WeightMatrix::Dense(table) => table.index_select(&ids, 0)?.reshape((b, l, d)),
            WeightMatrix::Packed(p) => {
                Tensor::from_vec(p.gather_rows(&id_list), (b, l, p.k()), &self.device)
            }
            WeightMatrix::Quantized(q) => q
                .gather_rows(&ids)?
                .to_dtype(self.dtype)?
                .reshape((b, l, d)),
        }
    }

    /// Runs the decoder on `embeds [B, L, D]`, extending `cache`.
    ///
    /// `attention_mask [B, L]` marks real (1) and padding (0) tokens of this chunk; `None` means all
    /// real. When `hidden_states` is given it receives the input and every layer's output (before
    /// `embedding_norm`). Returns the normed last hidden state `[B, L, D]`.
    pub fn forward(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut TextCache,
        hidden_states: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let l = embeds.dim(1)?;
        self.forward_tail(embeds, attention_mask, cache, hidden_states, l)
    }

    /// [`TextModel::forward`] returning only the last `keep` positions `[B, keep, D]`, with the
    /// same cache afterwards.
    ///
    /// Work no kept position depends on is skipped: after the last attention layer only the
    /// positions within the convolutions' reach are computed, and that attention layer computes
    /// queries for those alone (keys and values still cover the chunk, for the cache). For
    /// LFM2-350M with one kept position this skips about an eighth of a prefill.
    pub(crate) fn forward_tail(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut TextCache,
        mut hidden_states: Option<&mut Vec<Tensor>>,
        keep: usize,
    ) -> Result<Tensor> {
        let (b, l, _) = embeds.dims3()?;
        if keep == 0 || keep > l {
            candle_core::bail!("cannot keep {keep} positions of a {l}-token chunk")
        }
        // Every layer's output is recorded in full when asked for.
        let keep = if hidden_states.is_some() { l } else { keep };
        let mut rows_out = vec![0; self.layers.len()];
        let mut needed = keep;
        for (i, layer) in self.layers.iter().enumerate().rev() {
            rows_out[i] = needed;
            needed = layer.input_rows(needed, l);
        }
        if cache.batch_size() != b || cache.layers.len() != self.layers.len() {
            candle_core::bail!(
                "text cache is for {} rows and {} layers, the input has {b} rows",
                cache.batch_size(),
                cache.layers.len()
            )
        }
        let ctx = self.step_context(b, l, attention_mask, cache, embeds.dtype())?;
        let mut x = embeds.narrow(1, l - needed, needed)?;
        if let Some(hs) = hidden_states.as_deref_mut() {
            hs.push(x.clone());
        }
        let layers = self
            .layers
            .iter()
            .zip(cache.layers.iter_mut())
            .zip(rows_out);
        for ((layer, layer_cache), rows) in layers {
            x = layer.forward(&x, &ctx, layer_cache, rows, l)?;
            if let Some(hs) = hidden_states.as_deref_mut() {
                hs.push(x.clone());
            }
        }
        self.embedding_norm.forward(&x)
    }

    /// Logits `[..., vocab]` for normed hidden states `[..., D]`.
    pub(crate) fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let d = self.cfg.hidden_size;
        let rows = hidden.elem_count() / d.max(1);
        let hidden = hidden.reshape((rows, d))?;
        let logits = self.lm_head.linear(&hidden, None)?;
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.lm_head.out_dim();
        }
        logits.reshape(out)
    }

    /// Positions, RoPE tables and masks for a chunk of `l` new tokens; records them in `cache`.
    fn step_context(
        &self,
        b: usize,
        l: usize,
        attention_mask: Option<&Tensor>,
        cache: &mut TextCache,
        dtype: DType,
    ) -> Result<StepContext> {
        let dev = self.device();
        let chunk_mask: Vec<Vec<bool>> = match attention_mask {
            Some(m) => {
                let (mb, ml) = m.dims2()?;
                if (mb, ml) != (b, l) {
                    candle_core::bail!("attention mask is [{mb}, {ml}], the input is [{b}, {l}]")
                }
                m.to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|row| row.into_iter().map(|v| v != 0.0).collect())
                    .collect()
            }
            None => vec![vec![true; l]; b],
        };
        let past = cache.seq_len();
        let mut positions = Vec::with_capacity(b);
        for (row, mask) in chunk_mask.iter().enumerate() {
            let mut next = cache.next_pos[row];
            let mut pos = Vec::with_capacity(l);
            for &real in mask {
                pos.push(if real { next } else { 0 });
                next += usize::from(real);
            }
            cache.next_pos[row] = next;
            cache.key_mask[row].extend_from_slice(mask);
            positions.push(pos);
        }
        let (cos, sin) = self.rotary.cos_sin(&positions, dtype, dev)?;
        let any_padding = cache.key_mask.iter().flatten().any(|&m| !m);
        let t = past + l;
        let attn_mask = if l == 1 && !any_padding {
            None
        } else {
            // Query i (absolute past + i) sees real keys j <= past + i, and always itself so that a
            // padding query has a finite softmax (its output is never used).
            let mut mask = vec![0f32; b * l * t];
            for (row, keys) in cache.key_mask.iter().enumerate() {
                for i in 0..l {
                    let q = past + i;
                    let out = &mut mask[(row * l + i) * t..(row * l + i + 1) * t];
                    for (j, m) in out.iter_mut().enumerate() {
                        if j != q && (j > q || !keys[j]) {
                            *m = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            Some(Tensor::from_vec(mask, (b, 1, 1, l, t), dev)?.to_dtype(dtype)?)
        };
        let chunk_has_padding = chunk_mask.iter().flatten().any(|&m| !m);
        let pad_mask = if chunk_has_padding {
            let flat: Vec<f32> = chunk_mask
                .iter()
                .flatten()
                .map(|&m| if m { 1.0 } else { 0.0 })
                .collect();
            Some(Tensor::from_vec(flat, (b, l, 1), dev)?.to_dtype(dtype)?)
        } else {
            None
        };
        Ok(StepContext {
            cos,
            sin,
            attn_mask,
            pad_mask,
        })
    }
}

impl LinearVisitor for TextModel {
    fn visit_linears(&self, f: &mut dyn FnMut(&Linear)) {
        for layer in &self.layers {
            layer.visit(f);
        }
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        for layer in &mut self.layers {
            layer.visit_mut(f);
        }
    }
}
