export { expertLoRADelta, expertDeltaSum, EXPERT_WEIGHT_LAYOUTS, type ExpertWeightLayout } from './delta.js';
export { materializeExpertLoRA, type MaterializeOptions } from './materialize.js';
export { routerLogits } from './router_logits.js';
export {
  expertFactorA, expertFactorB, peftLayoutA, peftLayoutB, stackExpertFactors,
  type StackedExpertFactors,
} from './layout.js';
export { checkExpertFactors, checkRouterFactors } from './validate_lora.js';
export { splitExpertLoRA, type SplitExpertLoRAOptions } from './split.js';
export { loraLinear, type LinearLoRABranch } from './linear.js';
