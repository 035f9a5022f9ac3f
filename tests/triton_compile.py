"""Compile training/triton_sddmm.py's kernel ahead of time for sm80 (A100) and sm90 (H100/H200), no GPU needed;
prints one 'compiled ...' line per case and fails on any compiler error or when tl.dot does not reach the
tensor cores. Run by tests/test_sft_triton.py in a process without TRITON_INTERPRET."""

import inspect

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from training import triton_sddmm

# (operand dtype, rows per block, dot precision, compute capability): each dtype, block height and generation once
CASES = (("bf16", 16, "tf32", 90), ("fp16", 64, "tf32", 80), ("fp32", 128, "tf32x3", 90))


def main() -> None:
    kernel = triton.jit(triton_sddmm._sddmm_kernel)
    names = list(inspect.signature(triton_sddmm._sddmm_kernel).parameters)
    for dtype, block_r, precision, capability in CASES:
        pointers = {"p_ptr": f"*{dtype}", "q_ptr": f"*{dtype}", "out_ptr": "*fp32"}
        pointers.update({name: "*i32" for name in ("rows_ptr", "cols_ptr", "programs_ptr")})
        constants = {
            "BLOCK_R": block_r,
            "BLOCK_C": triton_sddmm.BLOCK_C,
            "BLOCK_T": triton_sddmm.BLOCK_T,
            "PRECISION": precision,
        }
        signature = {n: pointers.get(n, "constexpr" if n in constants else "i32") for n in names}
        source = ASTSource(
            fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constants.items()}
        )
        warps = triton_sddmm.num_warps(block_r)
        target = GPUTarget("cuda", capability, 32)
        compiled = triton.compile(source, target=target, options={"num_warps": warps})
        assert "mma" in compiled.asm["ptx"], f"{dtype} R={block_r} sm{capability}: tl.dot did not use mma"
        assert compiled.asm["cubin"]
        print(f"compiled {dtype} R={block_r} for sm{capability}: {compiled.metadata.shared} B shared memory")


if __name__ == "__main__":
    main()
