import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-backend-wasm';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { moeBlock } from '../src/ops/moe_block.js';
const backend = process.argv[2] ?? 'wasm';
const kernel = process.argv[3] ?? 'fused';
const lora = process.argv[4] ?? 'none';
const T = +(process.argv[5] ?? 1024);
await tf.setBackend(backend); await tf.ready(); registerMoEKernels(backend);
const H=256,I=128,E=8,K=2,r=8;
const x=tf.randomNormal([T,H],0,1,'float32',1) as tf.Tensor2D;
const g=tf.randomNormal([T,H],0,1,'float32',2) as tf.Tensor2D;
const rw=tf.randomNormal([E,H],0,0.1/16,'float32',3) as tf.Tensor2D;
const w1=tf.randomNormal([E,2*I,H],0,1/16,'float32',4) as tf.Tensor3D;
const w2=tf.randomNormal([E,H,I],0,1/11,'float32',5) as tf.Tensor3D;
const cfg={routing:{kind:'softmaxTopK' as const,topK:K,renormalize:true},activation:{kind:'swiglu' as const}};
const uA=tf.randomNormal([r*E,H],0,0.06,'float32',6) as tf.Tensor2D, uB=tf.randomNormal([2*I,r*E],0,0.01,'float32',7) as tf.Tensor2D;
const dA=tf.randomNormal([r*E,I],0,0.06,'float32',8) as tf.Tensor2D, dB=tf.randomNormal([H,r*E],0,0.01,'float32',9) as tf.Tensor2D;
const f = lora==='none'
 ? (xx: tf.Tensor, a: tf.Tensor, b: tf.Tensor) => tf.sum(tf.mul(moeBlock(xx as tf.Tensor2D,{router:{weight:rw},experts:{gateUp:a as tf.Tensor3D,down:b as tf.Tensor3D}},cfg,{expertKernel:kernel}).out,g))
 : (xx: tf.Tensor, a: tf.Tensor, b: tf.Tensor, c: tf.Tensor, d: tf.Tensor) => tf.sum(tf.mul(moeBlock(xx as tf.Tensor2D,{router:{weight:rw},experts:{gateUp:w1,down:w2,gateUpLoRA:[{A:a as tf.Tensor2D,B:b as tf.Tensor2D,scaling:2}],downLoRA:[{A:c as tf.Tensor2D,B:d as tf.Tensor2D,scaling:2}]}},cfg,{expertKernel:kernel,loraMode:lora as any}).out,g));
const ins = lora==='none' ? [x,w1,w2] : [x,uA,uB,dA,dB];
const step=()=>{ const gs=tf.grads(f as any)(ins); tf.dispose(gs); };
let t0=performance.now(); step(); console.log('first', (performance.now()-t0).toFixed(0));
t0=performance.now(); step(); console.log('second', (performance.now()-t0).toFixed(0));
const info = await tf.profile(step);
const by = new Map<string,{ms:number,n:number}>();
for (const k of info.kernels) { const key=k.name+' '+JSON.stringify(k.inputShapes); const e=by.get(key)??{ms:0,n:0}; e.ms+=k.kernelTimeMs as number; e.n++; by.set(key,e); }
const tot=[...by.values()].reduce((s,e)=>s+e.ms,0);
console.log('total kernel ms', tot.toFixed(0), 'kernels', info.kernels.length);
for (const [k,e] of [...by.entries()].sort((a,b)=>b[1].ms-a[1].ms).slice(0,+(process.env.TOP??25))) console.log(e.ms.toFixed(1).padStart(8), String(e.n).padStart(4), k);
