"""Data parallelism: the per-device `step`, its wrappers, and data placement.

`step` is plain per-device code; the device axis appears only in its collectives (and in
`lax.axis_index`, so each device draws different dropout masks: `dropout_key`). Which
collectives depends on where the state lives (`sharding.StateLayout`, the setting
`state_sharding`): replicated, the default, averages the gradient with `lax.pmean`; the
sharded levels reduce-scatter it and gather parameters.
Replicated state is one `jax.Array` per leaf with sharding `NamedSharding(mesh, P())`,
passed to `jax.pmap` with `in_axes=None` / `out_axes=None`: no stacked replicas, no
per-step gathers. Sharded state splits a dimension of each leaf over the devices, which
`jax.pmap` cannot express (it maps over a leading axis it removes): the same `step` then
runs under `jax.jit(jax.shard_map(...))` (`shard_map_step`), as pmap itself has since JAX 0.8.
Batches are (n_devices, B / n_devices, T) arrays sharded `P(AXIS)` over their first axis.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parallel_gpt.errors import LayoutError
from parallel_gpt.optim import AdamHParams, AdamState, guarded_update
from parallel_gpt.sharding import AXIS, StateLayout, TrainState

# How dropout keys derive from the seed (`dropout_key`); checkpoints record it, and a
# resume that would draw different masks is refused.
RNG_VERSION = 1


def make_mesh(devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `devices` local devices of every process (default: all)."""
    local = jax.local_devices()
    if devices is not None and not 1 <= devices <= len(local):
        raise LayoutError(f"devices={devices} but this process has {len(local)} {local[0].platform} device(s): "
                          f"use devices between 1 and {len(local)}")
    if devices is not None and devices < len(local) and jax.process_count() > 1:
        raise LayoutError("devices=N with several processes is not supported: every process uses all its devices")
    chosen = local[: devices or len(local)] if jax.process_count() == 1 else jax.devices()
    return Mesh(np.array(chosen), (AXIS,))


def make_layout(batch_size: int, grad_accum: int = 1, devices: int | None = None) -> Mesh:
    """The mesh for a run (see `make_mesh`), after checking that its global batch divides
    over the devices and each device's share into `grad_accum` micro-batches. Each process
    must hold the same number of devices, so the batch then divides over processes too."""
    mesh = make_mesh(devices)
    per_process = collections.Counter(d.process_index for d in mesh.devices.flat)
    if len(set(per_process.values())) > 1:
        raise LayoutError(f"processes hold different numbers of devices ({dict(per_process)}): give every process "
                          f"the same number")
    check_layout(batch_size, grad_accum, mesh.size)
    return mesh


def check_layout(batch_size: int, grad_accum: int, n: int, where: str = ""):
    """LayoutError unless the global batch divides over `n` devices (`where`: which ones)
    and each device's share into `grad_accum` micro-batches."""
    if batch_size % n:
        lower = batch_size // n * n
        nearest = " or ".join(str(b) for b in (lower, lower + n) if b > 0)
        raise LayoutError(f"batch_size={batch_size} is not divisible by the {n} devices{where}: use {nearest}")
    if batch_size // n % grad_accum:
        raise LayoutError(f"grad_accum={grad_accum} does not divide the per-device batch {batch_size // n} "
                          f"(batch_size={batch_size} over {n} devices): use a grad_accum that divides it")


def shard_batch(local_rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows (B_local, T) -> a global (n_devices, B / n_devices, T) array,
    each device holding one (1, B / n_devices, T) slice."""
    n_local = len(mesh.local_devices)
    rows = local_rows.reshape(n_local, -1, *local_rows.shape[1:])  # (n_local, B_local / n_local, T)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), rows)


def loss_and_grads(model, xb, yb, key, grad_accum: int, dtype, gather=None):
    """Mean loss and gradient over this device's rows, in `grad_accum` sequential slices
    (`gather`: `GPT.__call__`'s, for fully sharded state)."""
    value_and_grad = jax.value_and_grad(lambda m, x, y, k: m.loss(x, y, key=k, dtype=dtype, gather=gather))
    if grad_accum == 1:
        return value_and_grad(model, xb, yb, key)
    xs = xb.reshape(grad_accum, -1, xb.shape[-1])  # (A, B_dev / A, T)
    ys = yb.reshape(grad_accum, -1, yb.shape[-1])
    keys = jax.random.split(key, grad_accum) if key is not None else None

    def micro(carry, inputs):
        x, y, k = inputs
        loss, grads = value_and_grad(model, x, y, k)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, model))
    total, _ = lax.scan(micro, zero, (xs, ys, keys))
    return jax.tree.map(lambda t: t / grad_accum, total)


def step(model, xb, yb, opt_state, stop=0, *, hp: AdamHParams, seed: int = 0, grad_accum: int = 1,
         dtype=jnp.float32, layout: StateLayout | None = None):
    """One data-parallel training step, as seen by one device.

    xb, yb: this device's (B / n_devices, T) token ids and targets. Gradients and loss are
    averaged over the device axis, then AdamW (with clipping) updates the state.
    `layout` says where the state lives (default: replicated) and so which collectives
    average and update (`sharding.StateLayout`): the model and optimizer state come in and
    go out as this device holds them.
    A non-finite loss or gradient norm skips the update: model and optimizer state come
    back unchanged and metrics["nonfinite"] is 1; every device decides alike (the norm is
    of the whole gradient).
    stop: this device's stop request (a signal number, 0 for none; see `DataParallel.step`);
    metrics["stop"] is the largest over all devices of all processes, so a signal that
    reached one host stops every process at the same step.
    Returns (model, opt_state, metrics); metrics are identical on all devices.
    """
    layout = layout or StateLayout("replicated", lax.axis_size(AXIS), model)
    key = dropout_key(seed, opt_state.count) if model.config.dropout > 0 else None
    gather = layout.gather if layout.sharded_model else None
    loss, grads = loss_and_grads(model, xb, yb, key, grad_accum, dtype, gather)
    loss, grads, grad_norm = layout.reduce(loss, grads)
    params, opt_state, metrics = guarded_update(layout.own(model), grads, loss, opt_state, hp,
                                                grad_norm=grad_norm, decays=layout.decays)
    if lax.axis_size(AXIS) > 1:
        # Taken with the skip flag (the same on every device), which depends on the loss and
        # the gradient: the stop's all-reduce cannot then run before the blocks' gathers
        # (XLA:CPU runs independent collectives concurrently and, measured, deadlocked).
        stop = lax.pmax(jnp.stack([stop, metrics["nonfinite"]]), AXIS)[0]
    metrics["stop"] = stop
    return layout.rebuild(params), opt_state, metrics


def dropout_key(seed: int, count):
    """This device's dropout key for update `count` (RNG_VERSION 1): a pure function of
    (seed, update count, device), so a resumed run draws the same masks as an
    uninterrupted one, and every device draws its own."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), count), lax.axis_index(AXIS))


def eval_step(model, xb, yb, *, dtype=jnp.float32, layout: StateLayout | None = None):
    """Mean loss over the global batch (no dropout), identical on all devices."""
    gather = layout.gather if layout is not None and layout.sharded_model else None
    return lax.pmean(model.loss(xb, yb, dtype=dtype, gather=gather), AXIS)


class DataParallel:
    """The per-device `step` over the devices of `mesh`, with what it needs around it:
    placing the training state and the batches, and the stop requests it agrees on.

        dp = DataParallel(mesh, hp=hp, state_sharding="full")
        state = dp.place(model)                  # AdamW state made when not given
        state, metrics = dp.step(state, *dp.batch(x, y))
        host = dp.to_host(state)                 # logical numpy arrays, as checkpoints hold them

    `state_sharding`: `sharding.LEVELS`. The first `place` fixes the layout (it needs the
    model's shapes) and wraps the step: `jax.pmap` for replicated state, `shard_map_step`
    for sharded.
    """

    def __init__(self, mesh: Mesh, *, hp: AdamHParams, seed: int = 0, grad_accum: int = 1, dtype=jnp.float32,
                 state_sharding: str = "replicated"):
        self.mesh, self.state_sharding = mesh, state_sharding
        self._kwargs = dict(hp=hp, seed=seed, grad_accum=grad_accum, dtype=dtype)
        self.layout: StateLayout | None = None
        self._stops = {}  # signal number -> its `stop` input, placed once

    def _wrap(self, model):
        self.layout = layout = StateLayout(self.state_sharding, self.mesh.size, model)
        dtype = self._kwargs["dtype"]
        if layout.level == "replicated":
            devices = list(self.mesh.devices.flat)
            # State in and out once per step (in_axes/out_axes None: replicated), batches and
            # stop requests split over the device axis.
            self._step = jax.pmap(functools.partial(step, **self._kwargs, layout=layout), axis_name=AXIS,
                                  in_axes=(None, 0, 0, None, 0), out_axes=None, donate_argnums=(0, 3),
                                  devices=devices)
            self._eval = jax.pmap(functools.partial(eval_step, dtype=dtype, layout=layout), axis_name=AXIS,
                                  in_axes=(None, 0, 0), out_axes=None, devices=devices)
        else:
            self._step = shard_map_step(self.mesh, layout, **self._kwargs)
            self._eval = jax.jit(jax.shard_map(
                lambda model, xb, yb: eval_step(model, xb[0], yb[0], dtype=dtype, layout=layout), mesh=self.mesh,
                in_specs=(layout.partitions.model, P(AXIS), P(AXIS)), out_specs=P(), check_vma=False))

    def place(self, model, opt: AdamState | None = None) -> TrainState:
        """The training state on the mesh, laid out at this `state_sharding`: `model` and
        `opt` logical (whole arrays, host or device), AdamW's moments made when `opt` is None."""
        if self.layout is None:
            self._wrap(model)
        return self.layout.place(TrainState(model, opt), self.mesh)

    def to_host(self, state: TrainState, keep: bool = True) -> TrainState | None:
        """The state as logical numpy arrays (`StateLayout.to_host`; with several processes
        every process calls it, and those with `keep` False get None)."""
        return self.layout.to_host(state, keep)

    def batch(self, *local_rows: np.ndarray) -> tuple[jax.Array, ...]:
        """This process's rows of each array, placed over the mesh (`shard_batch`)."""
        return tuple(shard_batch(a, self.mesh) for a in local_rows)

    def step(self, state: TrainState, xb, yb, signum: int = 0) -> tuple[TrainState, dict]:
        """One training step; `signum` is this process's stop request (0: none), and
        metrics["stop"] the one agreed by every process. `state` is donated."""
        model, opt, metrics = self._step(state.model, xb, yb, state.opt, self.stop_input(signum))
        return TrainState(model, opt), metrics

    def lower(self, state: TrainState, xb, yb):
        """The step traced and lowered for these arguments (`.compile()` it to time compilation)."""
        return self._step.lower(state.model, xb, yb, state.opt, self.stop_input(0))

    def eval(self, model, xb, yb) -> jax.Array:
        """Mean loss over the global batch, no dropout; `model` as the state holds it."""
        return self._eval(model, xb, yb)

    def stop_input(self, signum: int) -> jax.Array:
        """The wrapped step's `stop` argument for this process's request `signum`, placed once."""
        if signum not in self._stops:
            n_local = len(self.mesh.local_devices)
            self._stops[signum] = jax.make_array_from_process_local_data(
                NamedSharding(self.mesh, P(AXIS)), np.full(n_local, signum, np.int32))
        return self._stops[signum]


def shard_map_step(mesh: Mesh, layout: StateLayout, **step_kwargs):
    """`step` under `jax.jit(jax.shard_map(...))` over `mesh`, the state laid out by
    `layout`: called as `DataParallel`'s `jax.pmap` wrapper is, (model, xb, yb, opt_state,
    stop); for replicated state, with the same results bit for bit. Model and optimizer
    state are donated.
    It needs only the mesh, so it also compiles ahead of time for devices this host lacks
    (`plan`).

    check_vma=False, as pmap runs `step`: `step` averages gradients itself. With the check
    on, JAX already sums the replicated model's gradients over the axis in the backward
    pass (measured: 8-device losses leave pmap's at step 3), LayerNorm's written-out
    backward is rejected, and on a one-device mesh, where `step` skips the pmean, the loss
    is refused as not replicated.
    """
    per_device = functools.partial(step, layout=layout, **step_kwargs)

    def body(model, xb, yb, opt_state, stop):
        # shard_map keeps the sharded axis: each device sees (1, B / n_devices, T) where
        # pmap's view drops it, so the wrapper takes row 0 and `step` stays as it is.
        return per_device(model, xb[0], yb[0], opt_state, stop[0])

    state, batch = layout.partitions, P(AXIS)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(state.model, batch, batch, state.opt, batch),
                           out_specs=(state.model, state.opt, P()), check_vma=False)
    return jax.jit(mapped, donate_argnums=(0, 3))
