/**
 * softmaxTopK routing on WebGPU: the selection and the weights come from one kernel
 * (WebGPUMoESoftmaxTopK: logits → softmax → top-k → renormalized weights per token), the logits'
 * gradient from another (WebGPUMoESoftmaxTopKGrad: the routing ops' analytic backward — softmax,
 * gather of the chosen, normalize — in one pass per token, recomputed from the saved logits).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Tensor, Tensor2D } from '@tensorflow/tfjs-core';
import {
  checkBoolean, checkLogits, checkOptions, checkTopK, selectExperts, tidyRouting,
} from '../../ops/routing/common.js';
import type { SoftmaxTopKOptions } from '../../ops/routing/softmax_topk.js';
import type { Routing } from '../../ops/types.js';
import { softmaxTopKGradKernel, softmaxTopKKernel } from './kernels.js';

/**
 * routeSoftmaxTopK for the 'webgpu' backend: same arguments, result and gradients.
 *
 * ```js
 * const {weights, experts} = webgpuRouteSoftmaxTopK(logits, 2);
 * ```
 */
export function webgpuRouteSoftmaxTopK(logits: Tensor2D, k: number, options: SoftmaxTopKOptions = {}): Routing {
  const op = 'routeSoftmaxTopK';
  checkLogits(op, logits);
  checkOptions(op, options);
  checkTopK(op, k, logits.shape[1]);
  const renormalize = checkBoolean(op, 'renormalize', options.renormalize, true);
  return tidyRouting(logits, () => {
    const [chosen, kernelWeights] = softmaxTopKKernel(logits, k, renormalize);  // [T, K] each
    const experts = selectExperts(logits, () => chosen.clone());
    const weigh = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
      const [x, save] = args as [Tensor2D, GradSaveFunc];
      // experts is saved (cloned) too: the caller may dispose the Routing before backprop
      save([x, experts]);
      return {
        value: kernelWeights.clone(),
        gradFunc: (dy: Tensor, saved: Tensor[]) => {
          const [xS, chosenS] = saved as Tensor2D[];
          return softmaxTopKGradKernel(xS, chosenS, dy as Tensor2D, renormalize);   // [T, E]
        },
      };
    });
    return { weights: weigh(logits) as Tensor2D, experts };
  });
}
