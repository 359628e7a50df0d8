"""Where the training state lives: replicated on every device, or sharded over them (ZeRO).

One setting, `state_sharding`, three levels (P parameters, N devices, bytes per device):

  replicated  every device holds the model, its gradient and both AdamW moments: 16P. The
              gradient is all-reduced (`lax.pmean`). The default, as the design card has it.
  optimizer   ZeRO-1/2: the moments are sharded. The gradient is reduce-scattered
              (`lax.psum_scatter`), each device updates its 1/N of the parameters with its
              slice of the moments, and `lax.all_gather` rebuilds the whole parameters: the
              same bytes on the wire as an all-reduce. 4P + 12P/N, plus the whole gradient
              while it is computed.
  full        ZeRO-3 / FSDP: the parameters are sharded too. The forward pass gathers each
              block's parameters just before the block runs (`GPT.__call__`'s `gather`) and
              the backward pass gathers them again; the transpose of an all-gather is a
              reduce-scatter, so the gradient arrives sharded. 16P/N, plus one block's whole
              weights and the embeddings.

On one device every level is the replicated layout (the same program).

How a leaf is split (`LeafSpec`): along the first dimension of its per-layer shape that N
divides, so the shard keeps the leaf's rank and the per-leaf code runs unchanged; a leaf
that no dimension of fits (N = 7 and GPT-2's 768-wide LayerNorm gain) is flattened, per
layer when layers are stacked, and zero-padded to a multiple of N. Any N works. Every leaf
is split, none left replicated: the gradient's global norm is then one `lax.psum` of each
device's sum of squares. Padding holds zeros and keeps them: its gradient is zero, so AdamW
moves it by 0 / (0 + eps) and decays 0.

Outside the step the state is logical: `to_host` gives whole arrays, blocks unstacked, what
checkpoints hold whatever the level, device count or layer stacking; `place` takes them back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parallel_gpt.optim import AdamState, adam_init

AXIS = "batch"
LEVELS = ("replicated", "optimizer", "full")


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """How one leaf is split over `n` devices. `leading`: the stacked layer axis ((n_layer,)
    for a stacked block's leaf, () otherwise), never split; `shape`: one layer's shape;
    `dim`: the axis of `shape` split, or None when the leaf is flattened and padded."""

    leading: tuple[int, ...]
    shape: tuple[int, ...]
    n: int
    dim: int | None

    @classmethod
    def choose(cls, shape, n: int, stacked: bool) -> "LeafSpec":
        leading, layer = tuple(shape[:int(stacked)]), tuple(shape[int(stacked):])
        return cls(leading, layer, n, next((d for d, size in enumerate(layer) if size % n == 0), None))

    def layer(self) -> "LeafSpec":
        """The spec of one layer's slice (inside the scan over layers)."""
        return dataclasses.replace(self, leading=())

    @property
    def axis(self) -> int:
        """The axis split in the stored leaf (`store`)."""
        return len(self.leading) + (self.dim or 0)

    @property
    def padded(self) -> int:
        return -(-math.prod(self.shape) // self.n) * self.n

    def stored_shape(self) -> tuple[int, ...]:
        return self.leading + (self.shape if self.dim is not None else (self.padded,))

    def partition(self) -> P:
        return P(*(None,) * self.axis, AXIS)

    def store(self, x):
        """A whole leaf (numpy or JAX) in the form that is split: itself, or flattened and padded."""
        if self.dim is not None:
            return x
        xp = np if isinstance(x, np.ndarray) else jnp
        flat = x.reshape(*self.leading, -1)  # (..., size)
        return xp.pad(flat, [(0, 0)] * len(self.leading) + [(0, self.padded - flat.shape[-1])])

    def restore(self, x):
        """`store`'s inverse."""
        if self.dim is not None:
            return x
        return x[..., :math.prod(self.shape)].reshape(*self.leading, *self.shape)

    # Inside the step (under shard_map, on one device):
    def gather(self, shard):
        """This device's shard -> the whole leaf, from every device's."""
        return self.restore(lax.all_gather(shard, AXIS, axis=self.axis, tiled=True))

    def own(self, whole):
        """The whole leaf -> this device's shard of it."""
        stored = self.store(whole)
        size = stored.shape[self.axis] // self.n
        return lax.dynamic_slice_in_dim(stored, lax.axis_index(AXIS) * size, size, self.axis)

    def reduce_scatter(self, whole):
        """Every device's whole leaf -> this device's shard of their sum."""
        return lax.psum_scatter(self.store(whole), AXIS, scatter_dimension=self.axis, tiled=True)


def gather_together(specs: list[LeafSpec], shards: list) -> list:
    """`LeafSpec.gather` of several leaves in one all-gather: each shard flattened with its
    split axis first, laid end to end. Its transpose, the gradient's, is one reduce-scatter."""
    pieces = [jnp.moveaxis(shard, spec.axis, 0) for spec, shard in zip(specs, shards)]
    gathered = lax.all_gather(jnp.concatenate([p.reshape(-1) for p in pieces]), AXIS)  # (n, total)
    wholes, start = [], 0
    for spec, piece in zip(specs, pieces):
        block = gathered[:, start:start + piece.size].reshape(spec.n * piece.shape[0], *piece.shape[1:])
        wholes.append(spec.restore(jnp.moveaxis(block, 0, spec.axis)))
        start += piece.size
    return wholes


class TrainState(NamedTuple):
    """What a training step updates: the model and its AdamW state."""

    model: object  # a GPT
    opt: AdamState


class StateLayout:
    """The training state's layout at one level over `n` devices, for a model whose logical
    shapes `model` has (a GPT, or `GPT.shapes`). It gives where each leaf lives
    (`partitions`), moves logical state on and off the devices (`place`, `to_host`), and
    what the per-device step does differently at its level (`parallel.step`)."""

    def __init__(self, level: str, n: int, model):
        if level not in LEVELS:
            raise ValueError(f"state_sharding={level!r}: use one of {', '.join(LEVELS)}")
        # One device holds the whole state at every level: the replicated program, no collectives.
        self.level, self.n = (level if n > 1 else "replicated"), n
        self.sharded_model, self.sharded_opt = self.level == "full", self.level != "replicated"
        stacked = model.config.scan_layers
        self.specs = jax.tree_util.tree_map_with_path(
            lambda path, a: LeafSpec.choose(a.shape, n, stacked and path[0].name == "h"), model)
        self.decays = model.decays()  # from the logical shapes: a shard's say nothing
        h = self.specs.h if stacked else self.specs.h[0]  # every block's leaves have one layer's shapes
        self._gather_specs = {"wte": self.specs.wte, "wpe+ln_f": (self.specs.wpe, self.specs.ln_f),
                              "h": jax.tree.map(LeafSpec.layer, h)}
        split = lambda sharded: jax.tree.map(lambda spec: spec.partition() if sharded else P(), self.specs)  # noqa: E731
        moments = split(self.sharded_opt)
        # The PartitionSpec of each leaf of the TrainState.
        self.partitions = TrainState(split(self.sharded_model), AdamState(P(), moments, moments))

    # --- where the state lives

    def shardings(self, mesh: Mesh) -> TrainState:
        return jax.tree.map(lambda p: NamedSharding(mesh, p), self.partitions)

    def _stored(self, tree, sharded: bool):
        return jax.tree.map(lambda spec, a: spec.store(a), self.specs, tree) if sharded else tree

    def _stored_state(self, state: TrainState) -> TrainState:
        opt = state.opt
        return TrainState(self._stored(state.model, self.sharded_model),
                          AdamState(opt.count, self._stored(opt.mu, self.sharded_opt),
                                    self._stored(opt.nu, self.sharded_opt)))

    def place(self, state: TrainState, mesh: Mesh) -> TrainState:
        """The logical state (host or device arrays, blocks stacked as the model's config
        says; `state.opt` None for new AdamW moments) on `mesh`, in this layout."""
        shardings = self.shardings(mesh)
        if state.opt is None:  # the moments made where they live, not whole on one device first
            shapes = jax.eval_shape(lambda m: self._stored(m, self.sharded_opt), state.model)
            model = jax.device_put(self._stored(state.model, self.sharded_model), shardings.model)
            return TrainState(model, jax.jit(lambda: adam_init(shapes), out_shardings=shardings.opt)())
        return jax.device_put(self._stored_state(state), shardings)

    def abstract(self, state: TrainState, mesh: Mesh) -> TrainState:
        """The logical state's shapes (`jax.eval_shape`) as `place` would lay them out, with
        their shardings: nothing allocated."""
        shapes = jax.eval_shape(self._stored_state, state)
        return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            shapes, self.shardings(mesh))

    def to_host(self, state: TrainState, keep: bool = True) -> TrainState | None:
        """The logical state as numpy arrays, blocks unstacked (what checkpoints hold), one
        leaf at a time: a sharded leaf is gathered (with several processes every process
        must call this: the gather is a collective) and only one gathered leaf is on the
        devices at once. `keep` False: take part in the gathers, return None."""
        def host(tree, sharded):
            leaves = [_host_copy(x, keep) for x in jax.tree.leaves(tree)]
            if keep:
                tree = jax.tree.unflatten(jax.tree.structure(tree), leaves)
                return (jax.tree.map(lambda spec, a: spec.restore(a), self.specs, tree) if sharded
                        else tree).unstack_layers()
        model = host(state.model, self.sharded_model)
        opt = AdamState(_host_copy(state.opt.count, keep), host(state.opt.mu, self.sharded_opt),
                        host(state.opt.nu, self.sharded_opt))
        return TrainState(model, opt) if keep else None

    # --- inside the per-device step

    def gather(self, module, name: str):
        """`GPT.__call__`'s `gather` at level full: the whole parameters of `module`, one
        all-gather per leaf; "wpe+ln_f"'s leaves (a tuple of the two modules) in one."""
        specs = self._gather_specs[name]
        if name == "wpe+ln_f":
            return jax.tree.unflatten(jax.tree.structure(module),
                                      gather_together(jax.tree.leaves(specs), jax.tree.leaves(module)))
        return jax.tree.map(lambda spec, shard: spec.gather(shard), specs, module)

    def reduce(self, loss, grads):
        """The loss and gradient averaged over the devices: whole (replicated) or this
        device's shard of it (at level full it arrived as the shard of the sum), and the
        gradient's global L2 norm."""
        if self.level == "replicated":
            if self.n > 1:
                loss, grads = lax.pmean((loss, grads), AXIS)
            return loss, grads, jnp.sqrt(_squares(grads))
        if self.level == "optimizer":
            grads = jax.tree.map(lambda spec, g: spec.reduce_scatter(g), self.specs, grads)
        grads = jax.tree.map(lambda g: g / self.n, grads)
        # The loss and the norm of every device's shards in one all-reduce, which depends on
        # the gradient: so it runs after every collective of the backward pass (see
        # `GPT.__call__`), as do the update's.
        loss, squares = lax.psum(jnp.stack([loss / self.n, _squares(grads)]), AXIS)
        return loss, grads, jnp.sqrt(squares)

    def own(self, model):
        """The parameters this device updates: at level optimizer, its shard of each leaf."""
        if self.level != "optimizer":
            return model
        return jax.tree.map(lambda spec, p: spec.own(p), self.specs, model)

    def rebuild(self, params):
        """`own`'s inverse after the update: at level optimizer, the whole parameters gathered."""
        if self.level != "optimizer":
            return params
        return jax.tree.map(lambda spec, p: spec.gather(p), self.specs, params)


def _squares(grads):
    """The sum of the squares of every element of `grads`."""
    return sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))


def _host_copy(x, keep: bool):
    """A numpy copy of a JAX array, whole: a copy, not a view (a view of a CPU device
    buffer would keep the next step from reusing, donating, it while a background write
    holds the view). A replicated array is read from this process's first device; one
    sharded over several processes is gathered, every process taking part."""
    if not isinstance(x, jax.Array):
        return np.asarray(x) if keep else None
    if x.is_fully_replicated:
        return np.array(x.addressable_data(0)) if keep else None
    if x.is_fully_addressable:
        return np.array(x) if keep else None
    whole = multihost_utils.process_allgather(x, tiled=True)
    return whole if keep else None
