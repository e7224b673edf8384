/** The weight initializer the decoder layers share. */
import * as tfl from '@tensorflow/tfjs-layers';

/**
 * HF's initializer for linear and embedding weights: normal with std `std` (initializer_range).
 * std 0 is the zero distribution: zeros are filled without drawing a random number, which a
 * model built only to be overwritten by a checkpoint needs (drawing billions of normals is half
 * of a large model's load time).
 */
export function normalInitializer(std: number): ReturnType<typeof tfl.initializers.zeros> {
  return std === 0 ? tfl.initializers.zeros() : tfl.initializers.randomNormal({ mean: 0, stddev: std });
}
