"""The --fast path: one training step captured in a CUDA graph, replayed without Python overhead.

Optional and CUDA-only (on CPU it says so and returns the eager step); the method scripts reach
it as `common.fast_step`, and their step reads the same either way.
"""
import torch
import torch.nn as nn


def fast_step(step, example_batch, device, enabled, state=()):
    """Return `step` unchanged, or on CUDA with --fast a replay of one captured CUDA graph.

    `step(*batch)` must do a whole training step (forward, backward, optimizer step, any EMA)
    on fixed-shape tensors, without host syncs, and return the loss tensor. The optimizer
    comes from adam_options(..., fast=True). `state` lists what a step changes (modules,
    optimizers, tensors): the warm-up steps that capture needs are undone in place, so the
    run starts from the same weights as the eager one. Replays then cost no Python overhead.
    """
    if not enabled:
        return step
    if device.type != "cuda":
        print("--fast: no CUDA device, so this runs the eager step (the fast path is CUDA-only)", flush=True)
        return step
    tensors = [t for s in state if not isinstance(s, torch.optim.Optimizer)
               for t in (s.state_dict().values() if isinstance(s, nn.Module) else [s])]
    saved = [t.detach().clone() for t in tensors]
    static = [b.clone() for b in example_batch]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: allocates grads and optimizer state
        for _ in range(3):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():          # undo the warm-up in place; the graph keeps these addresses
        for t, v in zip(tensors, saved):
            t.copy_(v)
        for opt in (s for s in state if isinstance(s, torch.optim.Optimizer)):
            for st in opt.state.values():
                for v in st.values():
                    if torch.is_tensor(v):
                        v.zero_()  # a fresh Adam: zero moments, step 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(*static)

    def replay(*batch):
        for buf, b in zip(static, batch):
            buf.copy_(b)
        graph.replay()
        return static_loss.clone()
    return replay
