/** The routing ops: one file per family, plus route() and its registry. */
export { routeSoftmaxTopK } from './softmax_topk.js';
export type { SoftmaxTopKOptions } from './softmax_topk.js';
export { routeTopKSoftmax } from './topk_softmax.js';
export { routeSigmoidGroupTopK } from './sigmoid_group_topk.js';
export type { SigmoidGroupTopKOptions } from './sigmoid_group_topk.js';
export { routeSoftmaxGroupTopK } from './softmax_group_topk.js';
export type { SoftmaxGroupTopKOptions } from './softmax_group_topk.js';
export { routeSoftmaxGroupLimitedGreedy } from './softmax_group_limited_greedy.js';
export type { SoftmaxGroupLimitedGreedyOptions } from './softmax_group_limited_greedy.js';
export { routeSoftmaxBiasedTopK } from './softmax_biased_topk.js';
export type { SoftmaxBiasedTopKOptions } from './softmax_biased_topk.js';
export { registerRouting, registeredRoutingKinds, route } from './route.js';
export type { RoutingFn } from './route.js';
