/**
 * Shared contracts of the MoE ops. Ops, layers and backends import their types from here, never
 * from each other. Shapes use the letters of src/ops/README.md.
 */
import type { Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import type { ExpertWeightTensor } from './packed.js';

/** One LoRA adapter's factors on one weight; the delta is scaling·B·A (per expert for experts). */
export interface LoRAFactors {
  /** experts: [r·E, in] expert-major rows; router: [r, H] */
  A: Tensor2D;
  /** experts: [out, r·E] rank-major columns; router: [E, r] */
  B: Tensor2D;
  /** alpha / r, or alpha / sqrt(r) with rsLoRA */
  scaling: number;
  /**
   * PEFT's lora_dropout on this adapter's branch input in this call: y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ.
   * Absent or p = 0: none. The layers set it in training passes only.
   */
  dropout?: LoRADropout;
}

/**
 * Dropout on a LoRA branch input: each element kept with probability 1 − p and scaled by
 * 1/(1 − p), the mask drawn from `seed` (loraDropoutMask). Routed experts draw one mask row per
 * (token, slot) pair: each pair's branch input is dropped independently, as PEFT's per-expert
 * nn.Linear modules do.
 */
export interface LoRADropout {
  /** probability of zeroing an element, in [0, 1) */
  p: number;
  /** the mask's seed; absent: unseeded */
  seed?: number;
}

/** The registered routing families (see src/ops/routing/). */
export type RoutingKind =
  | 'softmaxTopK'                  // Mixtral, Qwen2/3-MoE, OLMoE
  | 'topKSoftmax'                  // gpt-oss
  | 'sigmoidGroupTopK'             // DeepSeek-V3, GLM-4.5-MoE
  | 'softmaxGroupTopK'             // Mistral4
  | 'softmaxGroupLimitedGreedy'    // DeepSeek-V2
  | 'softmaxBiasedTopK'            // ERNIE-4.5-MoE
  | 'topKSigmoid';                 // Llama 4

export interface RoutingConfig {
  kind: RoutingKind;
  /** K, experts per token */
  topK: number;
  /** divide the K weights by their sum (softmaxTopK, sigmoidGroupTopK, softmaxGroupTopK) */
  renormalize?: boolean;
  /** expert groups for the group-limited kinds; must divide E */
  nGroup?: number;
  /** groups kept per token */
  topkGroup?: number;
  /** routed_scaling_factor, multiplies the final weights (default 1) */
  scalingFactor?: number;
  /** the floor of the weights' divisor, max(Σ, normMin) (softmaxBiasedTopK: ERNIE's moe_norm_min, default 1e-12) */
  normMin?: number;
}

/** What every routing op returns. */
export interface Routing {
  /** [T, K] float32, differentiable w.r.t. the logits */
  weights: Tensor2D;
  /** [T, K] int32, the chosen experts (no gradient) */
  experts: Tensor2D;
  /** [T, E] the router logits, returned for aux losses */
  logits: Tensor2D;
}

export interface RouterWeights {
  /** W_g [E, H] */
  weight: Tensor2D;
  /** [E] added to the logits (gpt-oss) */
  bias?: Tensor1D;
  /** [E] DeepSeek's (ERNIE's, MiniMax's) e_score_correction_bias: used for selection only, gets no gradient */
  correctionBias?: Tensor1D;
  /** active router adapters, A [r, H], B [E, r]; their deltas add up */
  lora?: LoRAFactors[];
  /**
   * Gemma 4: the router reads rms(x)·inputScale·H^-½ instead of x (a weightless RMS norm with
   * `inputNormEpsilon`, then this learned scale [H])
   */
  inputScale?: Tensor1D;
  /** the epsilon of that norm (HF rms_norm_eps); required with inputScale */
  inputNormEpsilon?: number;
  /** Gemma 4's per_expert_scale [E]: each routing weight times its expert's scale, after routing */
  expertScale?: Tensor1D;
}

/**
 * 'outIn': HF default, W1 [E, 2I, H] (gate rows then up rows), W2 [E, H, I].
 * 'inOutInterleaved': gpt-oss, W1 [E, H, 2I] with gate = even columns, W2 [E, I, H].
 * 'inOut': Llama 4, W1 [E, H, 2I] with gate = the first I columns, up the last I, W2 [E, I, H].
 */
export type ExpertLayout = 'outIn' | 'inOutInterleaved' | 'inOut';

export interface ExpertWeights {
  /**
   * W1: [E, 2I, H] ('outIn') or [E, H, 2I] ('inOut', 'inOutInterleaved'); float32, or a PackedExpertWeight
   * (bf16/f16 halves in int32, frozen: never trained, see src/ops/packed.ts)
   */
  gateUp: ExpertWeightTensor;
  /** W2: [E, H, I] ('outIn') or [E, I, H] ('inOut', 'inOutInterleaved'); float32 or packed like gateUp */
  down: ExpertWeightTensor;
  /** [E, 2I] (gpt-oss), in the same column order as gateUp's output */
  gateUpBias?: Tensor2D;
  /** [E, H] (gpt-oss) */
  downBias?: Tensor2D;
  layout?: ExpertLayout;
  /** active adapters on W1: A [r·E, H], B [2I, r·E] (PEFT's output order = gateUp's output order) */
  gateUpLoRA?: LoRAFactors[];
  /** active adapters on W2: A [r·E, I], B [H, r·E] */
  downLoRA?: LoRAFactors[];
}

export type ExpertActivation =
  /** silu(gate) · up */
  | { kind: 'swiglu' }
  /** Gemma 4: gelu(gate) · up with GELU's tanh approximation (gelu_pytorch_tanh) */
  | { kind: 'gegluTanh' }
  /** gpt-oss: gate = min(gate, limit), up = clamp(up, −limit, limit), (up + 1)·gate·sigmoid(alpha·gate) */
  | { kind: 'clampedSwiglu'; alpha: number; limit: number };

/** A dense SwiGLU MLP: down(silu(gate(x)) · up(x)), PyTorch [out, in] weights. */
export interface SharedExpertWeights {
  gate: Tensor2D;   // [I_s, H]
  up: Tensor2D;     // [I_s, H]
  down: Tensor2D;   // [H, I_s]
  /** Qwen2-MoE: output scaled by sigmoid(x · gateᵀ), [1, H]; absent = unweighted (DeepSeek, GLM) */
  sigmoidGate?: Tensor2D;
  /**
   * active adapters per projection, plain 2-D LoRA like the router's: A [r, in], B [out, r]
   * (gate/up: A [r, H], B [I_s, r]; down: A [r, I_s], B [H, r]; sigmoidGate, only with a
   * sigmoidGate: A [r, H], B [1, r]); their deltas add up
   */
  lora?: { gate?: LoRAFactors[]; up?: LoRAFactors[]; down?: LoRAFactors[]; sigmoidGate?: LoRAFactors[] };
}

export interface MoEBlockWeights {
  router: RouterWeights;
  experts: ExpertWeights;
  shared?: SharedExpertWeights;
}

export interface MoEBlockConfig {
  routing: RoutingConfig;
  activation: ExpertActivation;
  /**
   * Llama 4: each chosen expert runs on the token scaled by its routing weight and the K outputs
   * are summed unweighted, out = Σ_k expert_k(w_k·x) (transformers' Llama4TextMoe); default
   * false: out = Σ_k w_k·expert_k(x). The two differ because the expert is not linear.
   */
  weightedInput?: boolean;
}

export type ExpertKernel = 'fused' | 'reference';
/** 'materialize': W_eff = W + s·B·A then grouped products; 'split': x·Wᵀ + s·(x·Aᵀ)·Bᵀ; 'auto' picks by cost. */
export type LoRAMode = 'materialize' | 'split' | 'auto';
