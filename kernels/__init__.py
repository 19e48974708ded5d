"""Bundled Triton kernels: quantization (quant_kernels), attention (attention_kernel), their launchers
(launch) and launch configurations per architecture (tuning). Importing this package needs Triton."""
