/** MoE layer descriptors and class-level patching (the plugin's register() drives them). */
export {
  registerMoELayerDescriptor, allDescriptors as moeLayerDescriptors, findMoELayerDescriptor, describeMoELayer,
  type MoELayerDescriptor, type MoELayerInfo, type MoELoRAHooks, type LayerClass,
} from './descriptor.js';
export { SPARSE_MOE_DESCRIPTOR } from './sparse_moe_descriptor.js';
export { findMoELayers, type FoundMoELayer } from './find_layers.js';
export { PATCHED_CALL, unwrapCall } from './patch_class.js';
