"""The gate on sharded gradients: which ranks share the monitor tensors, and the combine.

When the lm_head is sharded (FSDP2, tensor parallel, Megatron vocab-parallel)
each rank holds a piece of its gradient.  A sharded step is then

    backend.reduce(local shards) -> combine(state.acc) -> backend.finalize()

``reduce`` writes this rank's partial energy (the float64 sum of squares of
its local shards) into ``state.acc``; the combine all-gathers those partials
over the ranks that hold the other pieces into a float64[group size, 2] buffer,
whose entries are in group-rank order on every rank, and every rank sums that
same vector with the same kernel.  Same bits in, same bits out: every rank
finalizes on the same energy and ends the step with bit-identical state and
decision, independent of the collective's algorithm (a ring or tree
all-reduce would add in an order the library picks).  The collective is one
``all_gather_single`` (``all_gather_into_tensor``) of 16 bytes per rank (the partial energy and the KL), per
sharded mesh dimension; it runs on the device (no host sync) and, with NCCL,
can be captured in a CUDA graph.  Its cost at scale is in docs/distributed.md.

Which ranks: for a DTensor, the mesh dimensions on which its placement is a
Shard (``_StridedShard`` included, as FSDP2 x TP produces); Replicate
dimensions hold copies and are not counted; a Partial placement (a gradient
not reduced yet) is refused, because the energy of a sum is not the sum of
the energies.  Several sharded mesh dimensions are combined one after
another (gather + sum on the first, then on the second, ...), which leaves
every rank with the same bits too; pass ``process_group=`` a group over
exactly those ranks (e.g. a flattened mesh's group) to do it in one
collective.  For plain tensors that are shards (a hand-sharded or Megatron
vocab-parallel lm_head), ``process_group=`` names the group.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import state as S

try:  # torch >= 2.4 has the public module; older torch has no DTensor support here
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = Replicate = Shard = None

try:  # FSDP2 over a TP-sharded dim; not a subclass of Shard in torch 2.13
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover
    _StridedShard = None


# all_gather_single is all_gather_into_tensor's new name (torch 2.13 deprecates the old one)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: writing it writes the DTensor); a plain tensor unchanged."""
    if not is_dtensor(t):
        return t
    if torch.compiler.is_compiling():
        return t.to_local()
    # to_local() with grad mode on goes through an autograd Function; the
    # attribute is the same tensor (to_local() returns it under no_grad)
    return t._local_tensor


def _shard_like(p) -> bool:
    return isinstance(p, Shard) or (_StridedShard is not None and isinstance(p, _StridedShard))


def sharded_dims(placements, what: str) -> tuple[int, ...]:
    """The mesh dimensions on which a DTensor with ``placements`` is split into disjoint pieces; raises on Partial."""
    dims = []
    for d, p in enumerate(placements):
        if _shard_like(p):
            dims.append(d)
        elif isinstance(p, Replicate):
            continue
        elif p.is_partial():
            raise ValueError(
                f"{what} has placement {p} on mesh dimension {d} (placements {tuple(placements)}): a Partial "
                "gradient is not reduced yet, each rank holds a summand of it, and the energy of a sum is not "
                "the sum of the energies. Step the gate on the reduced gradient (Shard or Replicate), e.g. after "
                "the engine's reduce-scatter/all-reduce or after .redistribute()."
            )
        else:
            raise ValueError(
                f"{what} has placement {p!r} on mesh dimension {d}, which the gate does not know how to count "
                "(it handles Shard, _StridedShard and Replicate)"
            )
    return tuple(dims)


def _mesh_ranks(mesh, dims: tuple[int, ...], what: str) -> list[int]:
    """Global ranks of the sub-mesh over ``dims`` that contains this rank."""
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError(f"{what} lives on {mesh}, which does not contain this rank ({dist.get_rank()})")
    index = tuple(slice(None) if d in dims else coord[d] for d in range(mesh.ndim))
    return sorted(int(r) for r in mesh.mesh[index].flatten().tolist())  # host-read-ok: a CPU mesh table, read at construction


def _check_group(group, what: str = "process_group") -> list[int]:
    """The global ranks of ``group``; raises unless it is a process group this rank belongs to."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what} was given but torch.distributed is not initialized (call init_process_group)")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"{what} does not contain this rank ({dist.get_rank()}): new_group() returns GroupMember.NON_GROUP_MEMBER "
            "on ranks outside the group. Every rank that steps the gate must belong to the group it combines over."
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{what} must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{what} does not contain this rank ({dist.get_rank()})")
    return sorted(dist.get_process_group_ranks(group))


def multi_rank() -> bool:
    """True when torch.distributed runs more than one rank in this job (a host query, no collective)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Sharding:
    """Which ranks share this gate's decision, and how their partial energies combine; built once, at construction.

    group:   the process group every step's combine runs over: every rank that steps this gate (None: a
             single rank, nothing to combine)
    member:  bool[n_sets, group size] on the gate's device: which group ranks hold pieces of the same
             monitor gradient (a shard set); None when the whole group is one shard set
    ranks:   the global ranks of this rank's shard set (this rank included)
    specs:   per monitor tensor, (mesh, placements) of its DTensor gradient, or None for a plain tensor
    """

    def __init__(self, group, sets: Sequence[Sequence[int]], ranks: list[int], specs: list,
                 device: torch.device) -> None:
        self.group = group
        self.ranks = ranks
        self.specs = specs
        self.dims = [None if s is None else sharded_dims(s[1], "monitor") for s in specs]
        self.n_sets = len(sets)
        self.buffer = None if group is None else torch.zeros(dist.get_world_size(group) * S.N_ACC,
                                                             dtype=torch.float64, device=device)
        self.member = None
        if group is not None and len(sets) > 1:
            order = _group_ranks(group)  # group rank j is global rank order[j]
            self.member = torch.tensor([[r in s for r in order] for s in sets], dtype=torch.bool, device=device)

    @property
    def combines(self) -> bool:
        return self.group is not None

    @property
    def sharded(self) -> bool:
        """True when the monitor gradient is split across ranks (a shard set of more than one rank)."""
        return len(self.ranks) > 1

    def local_grads(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The local shards of the monitor gradients, after checking their layout (raises, changing nothing)."""
        out = []
        for i, (g, spec) in enumerate(zip(grads, self.specs)):
            if spec is None:
                if is_dtensor(g):
                    raise ValueError(f"monitor[{i}] is a plain tensor but its .grad is a DTensor")
                out.append(g)
                continue
            if not is_dtensor(g):
                raise ValueError(
                    f"monitor[{i}] is a DTensor but its .grad is a plain {type(g).__name__}: "
                    "the gate cannot tell which part of the gradient this rank holds"
                )
            mesh, placements = g.device_mesh, g.placements
            if not (mesh is spec[0] and placements == spec[1]):
                self._check_spec(i, mesh, placements)
            out.append(local_tensor(g))
        return out

    def _check_spec(self, i: int, mesh, placements) -> None:
        """A gradient laid out differently from its parameter: fine if it splits over the same ranks."""
        mine, dims_then = self.specs[i][0], self.dims[i]
        what = f"monitor[{i}].grad"
        if mesh != mine:
            raise ValueError(f"{what} lives on {mesh}, but the gate was built for {mine}")
        dims = sharded_dims(placements, what)
        if dims != dims_then:
            raise ValueError(
                f"{what} has placements {tuple(placements)} (sharded on mesh dims {list(dims)}), but the gate was "
                f"built for placements {tuple(self.specs[i][1])} (sharded on mesh dims {list(dims_then)}); "
                "rebuild the gate if the layout changed"
            )
        self.specs[i] = (mesh, tuple(placements))

    def combine(self, acc: torch.Tensor) -> None:
        """acc (float64[N_ACC]: this rank's partial energy and its KL) -> the energy and the KL every rank of
        the group finalizes on.

        One all-gather of 16 bytes per rank; then, on every rank, the same
        ops on the same gathered vectors.  The energy: the partials of each
        shard set summed in group-rank order, and the largest of those sums
        (NaN if any is NaN: a replica that saw a NaN closes every replica).
        Replicas of one gradient hold equal sums, so the largest is that sum;
        replicas that disagree (a gradient synchronized by hand after a hook
        read it, a rank that skipped the sync) still reach one decision, the
        most cautious one.  The KL: the mean over every rank of the group
        (each data-parallel rank measures it on its own tokens; NaN if any
        rank's is NaN).
        """
        _all_gather(self.buffer, acc, group=self.group)
        parts = self.buffer.view(-1, S.N_ACC)
        energy, kl = parts[:, S.ACC_ENERGY], parts[:, S.ACC_KL]
        out_energy, out_kl = acc[S.ACC_ENERGY : S.ACC_ENERGY + 1], acc[S.ACC_KL : S.ACC_KL + 1]
        if self.member is None:
            torch.sum(energy, dim=0, keepdim=True, out=out_energy)
        else:
            sums = torch.where(self.member, energy, torch.zeros_like(energy)).sum(dim=1)
            torch.amax(sums, dim=0, keepdim=True, out=out_energy)
        torch.mean(kl, dim=0, keepdim=True, out=out_kl)


def _group_ranks(group) -> list[int]:
    """Global ranks of ``group`` in group-rank order (the order all_gather fills its output in)."""
    if group is dist.group.WORLD or group is None:
        return list(range(dist.get_world_size()))
    return [dist.get_global_rank(group, j) for j in range(dist.get_world_size(group))]


def _decision_group(decision_group, dtensor_mesh, what: str):
    """The group every step combines over: ``decision_group`` when given, else every rank of the DTensor
    monitor's mesh, else the default (world) group; None on a single rank."""
    if decision_group is not None:
        _check_group(decision_group, "decision_group")
        return decision_group
    if dtensor_mesh is not None:
        if dtensor_mesh.ndim == 1:
            return dtensor_mesh.get_group(0)
        if dtensor_mesh.size() == dist.get_world_size():
            return dist.group.WORLD
        raise ValueError(
            f"{what} lives on a {dtensor_mesh.ndim}-D mesh of {dtensor_mesh.size()} ranks, not the whole job "
            f"({dist.get_world_size()} ranks): the gate cannot build a group over just those ranks without every "
            "rank of the job taking part. Pass decision_group= (a process group over exactly the mesh's ranks, "
            "e.g. dist.new_group(mesh.mesh.flatten().tolist()) called on every rank)."  # host-read-ok: message text
        )
    if multi_rank():
        return dist.group.WORLD
    return None


def _outside(members, ranks) -> ValueError:
    return ValueError(
        f"decision_group spans ranks {sorted(members)}, which does not hold every rank that shares the monitor "
        f"gradient ({sorted(ranks)}): the combine needs every piece"
    )


def _gather_sets(group, ranks: list[int]) -> list[tuple[int, ...]]:
    """Every group rank's shard set (a host all_gather_object at construction), checked to partition the group."""
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, tuple(ranks), group=group)
    order = _group_ranks(group)
    sets: list[tuple[int, ...]] = []
    for s in every:  # every rank checks the same gathered list, so every rank raises alike
        if any(r not in order for r in s):
            raise _outside(order, list(s))
    for j, s in enumerate(every):
        s = tuple(sorted(s))
        if order[j] not in s or any(tuple(sorted(every[order.index(r)])) != s for r in s):
            raise ValueError(
                f"the ranks that step this gate do not agree on who shares the monitor gradient (rank {order[j]} "
                f"says {list(s)}; every rank's set: {[list(x) for x in every]}): every rank of decision_group must "
                "pass the same process_group layout, and each shard set must lie inside decision_group"
            )
        if s not in sets:
            sets.append(s)
    return sets


def sharding_for(
    monitor: Sequence[torch.Tensor], process_group, device: torch.device, decision_group=None,
) -> Optional[Sharding]:
    """The Sharding of ``monitor``: None on a single rank with nothing sharded (no combine at all).

    Raises (before anything is built, and before any collective) on monitor
    tensors whose meshes or sharded dimensions disagree, a Partial placement,
    a process_group or decision_group this rank is not in, a process_group
    whose ranks differ from the DTensors' shards, and a mix of DTensor and
    plain monitor tensors without a process_group.
    """
    dts = [i for i, t in enumerate(monitor) if is_dtensor(t)]
    if not dts and process_group is None and decision_group is None and not multi_rank():
        return None
    if decision_group is not None and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("decision_group was given but torch.distributed is not initialized (call init_process_group)")
    group_ranks = None if process_group is None else _check_group(process_group)
    specs: list = [None] * len(monitor)
    ranks = group_ranks
    mesh = None
    if dts:
        plain = [i for i in range(len(monitor)) if i not in dts]
        if plain and process_group is None:
            raise ValueError(
                f"monitor{dts} are DTensors and monitor{plain} plain tensors, and no process_group was given: "
                "the gate cannot tell whether the plain tensors are shards or whole copies. Pass "
                "process_group= (the group the plain shards are split over) or monitor only DTensors."
            )
        first = monitor[dts[0]]
        mesh = first.device_mesh
        dims = sharded_dims(first.placements, f"monitor[{dts[0]}]")
        for i in dts[1:]:
            t = monitor[i]
            if t.device_mesh != mesh:
                raise ValueError(
                    f"monitor[{dts[0]}] lives on {mesh} and monitor[{i}] on {t.device_mesh}: every DTensor monitor "
                    "tensor must live on one device mesh (their partial energies are combined in one group)"
                )
            d = sharded_dims(t.placements, f"monitor[{i}]")
            if d != dims:
                raise ValueError(
                    f"monitor[{dts[0]}] is sharded on mesh dims {list(dims)} (placements {tuple(first.placements)}) "
                    f"and monitor[{i}] on {list(d)} (placements {tuple(t.placements)}): the gate sums partial energies "
                    "over one set of ranks, so every monitor tensor must be split over the same mesh dimensions"
                )
        mesh_ranks = _mesh_ranks(mesh, dims, f"monitor[{dts[0]}]")
        if process_group is None:
            ranks = mesh_ranks
        elif group_ranks != mesh_ranks:
            raise ValueError(
                f"process_group spans ranks {group_ranks}, but the DTensor monitor tensors are split over ranks "
                f"{mesh_ranks} (mesh dims {list(dims)} of {mesh}): the group must hold exactly the ranks that "
                "share the monitor gradient"
            )
        for i in dts:
            specs[i] = (monitor[i].device_mesh, tuple(monitor[i].placements))
    if ranks is None:  # plain tensors, no process_group: every rank holds the whole gradient
        ranks = [dist.get_rank()] if dist.is_available() and dist.is_initialized() else [0]
    group = _decision_group(decision_group, mesh, "monitor")
    if group is None:
        return Sharding(None, [ranks], ranks, specs, device)
    members = _group_ranks(group)
    gather = len(members) > 1 and (process_group is not None or decision_group is not None)
    if not gather and any(r not in members for r in ranks):
        # no collective follows (one rank), or every rank derives ranks and members from the same mesh: the
        # same verdict everywhere; where the ranks exchange their layouts, _gather_sets raises on all alike
        raise _outside(members, ranks)
    if len(members) == 1:
        return Sharding(None, [ranks], ranks, specs, device)
    if gather:
        sets = _gather_sets(group, ranks)  # the layout of the other ranks is not known here: ask them
    elif mesh is not None:
        sets = _mesh_sets(mesh, dims, members)
    else:
        sets = [(r,) for r in members]  # plain full copies: every rank is a replica
    return Sharding(group, sets, ranks, specs, device)


def _mesh_sets(mesh, dims: tuple[int, ...], members: list[int]) -> list[tuple[int, ...]]:
    """The shard sets of a DTensor mesh: for every coordinate of the other (replicate) dims, the ranks of the
    sub-mesh over the sharded ``dims``."""
    table = mesh.mesh  # a CPU tensor of global ranks
    other = [d for d in range(mesh.ndim) if d not in dims]
    moved = table.permute(*other, *dims).reshape(-1, int(math.prod(table.shape[d] for d in dims)) if dims else 1)
    sets = [tuple(sorted(int(r) for r in row.tolist())) for row in moved]  # host-read-ok: a CPU mesh table, read at construction
    return [s for s in sets if any(r in members for r in s)]
