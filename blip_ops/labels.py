"""Zero-shot category and policy labels from the scoring pass's image embeddings (BLIP's retrieval recipe).

ITC picks a short list, ITM re-ranks it, as BLIP's own retrieval does (LAVIS ``compute_sim_matrix``):

- every category prompt's ITC text feature is computed once per actor (``Labeller.__init__``); a
  batch then costs one small matrix product (rows x names) for every category's cosine;
- ITM runs only for each row's ``top_k`` names, its declared name, and the policy prompts, on the
  image embeddings the scoring pass already made: no second vision pass.

An ITM pass cross-attends its text to the image's 577 tokens (BLIP at 384 px), and the keys and values
of that attention are projections of the image alone: for a row's 14 prompts (3 names, a declared
one, 5 policies of 2 prompts) they are the same 14 times, and at BLIP-base sizes they are most of an
ITM pass's multiply-adds (12 layers x 2 x 577 x 768 x 768, 8.2 G a pair). By default a row's prompts
are packed into one sequence (``Labeller._itm_packed``), so they are projected once per row and never
copied per prompt: 1.36x the score stage's CPU time at 1,000 names against 1.71x for a call per row
(BENCHMARKS.md, "Labels"). With ``packed=False`` (a call per row) ``_OnceForAll`` still projects
them once per row: the prompts attend to the image expanded (a stride-0 view), and the wrapped
projection computes one image's and expands the result (2.70x -> 1.59x). Either way the numbers are
the same projection of the same row; only the kernels' blocking differs, as it already does between
batches.

Each value equals ``BlipForImageTextRetrieval`` on the single pair (image, prompt): ``itc`` its
``use_itm_head=False`` cosine, ``itm`` the softmax of its ITM head, class 1 (tests/reference.py).
Plain torch and numpy: no Ray, no pipeline imports; the pipeline hands it names, not files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.functional import normalize

from .precision import autocast

# Prompts per text-encoder call while embedding a taxonomy once per actor: 256 short prompts
# (about 8 tokens) keep the matrices large enough for the kernels without a large activation peak.
PROMPT_BATCH = 256
# Rows per packed ITM call (Labeller._itm_packed): the scorer's CPU chunk, whose activations stay in cache.
PACKED_ROWS = 8


class _OnceForAll(torch.nn.Module):
    """A cross-attention key or value projection that, given an image expanded over a batch (batch
    stride 0: one image, many texts), projects the one image and expands the result; anything
    else goes through unchanged."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    enabled = True  # benchmarks.labels_bench turns it off to measure what it saves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and x.dim() == 3 and x.shape[0] > 1 and x.stride(0) == 0:
            return self.inner(x[:1]).expand(x.shape[0], -1, -1)
        return self.inner(x)


def share_image_projections(text_encoder: torch.nn.Module) -> int:
    """Wrap every cross-attention key/value projection of ``text_encoder`` in ``_OnceForAll`` (once;
    idempotent). Returns how many are wrapped."""
    wrapped = 0
    for layer in text_encoder.encoder.layer:
        cross = getattr(layer, "crossattention", None)
        if cross is None:
            continue
        for name in ("key", "value"):
            module = getattr(cross.self, name)
            if not isinstance(module, _OnceForAll):
                setattr(cross.self, name, _OnceForAll(module))
            wrapped += 1
    return wrapped


@dataclass
class RowLabels:
    """One row's labels: ``labels`` as (name, kind, itc, itm) sorted by itm descending."""

    predicted: str | None
    score: float | None
    rank: int | None
    labels: list[dict]


def _pad(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, values in enumerate(ids):
        input_ids[row, : len(values)] = torch.tensor(values, dtype=torch.long)
        mask[row, : len(values)] = 1
    return input_ids.to(device), mask.to(device)


class Labeller:
    """Labels for a ``BlipScorer``'s rows: ``names`` (category prompts, already templated),
    ``policies`` as (name, [prompts]). Builds the prompts' ITC features once (``setup_s``)."""

    def __init__(self, scorer, category_names: list[str], category_prompts: list[str], top_k: int,
                 policies: list[tuple[str, list[str]]], itc_gates: list[float | None] | None = None, packed: bool = True):
        """``itc_gates``: per policy, ITM only for rows whose best prompt ITC reaches it (None: every
        row); a gated-out policy's ``itm`` is None. Policy prompts are most of a row's ITM passes
        (10 of 14 at 3 names, 5 policies of 2 prompts): the gate is what cuts them."""
        self.scorer = scorer
        self.model = scorer.model
        self.device = scorer.device
        self.names = list(category_names)
        self.top_k = min(top_k, len(self.names)) if self.names else 0
        self.policy_names = [name for name, _ in policies]
        self.gates = list(itc_gates) if itc_gates is not None else [None] * len(policies)
        self.policy_of = np.array([p for p, (_, prompts) in enumerate(policies) for _ in prompts], dtype=np.int64)
        policy_prompts = [prompt for _, prompts in policies for prompt in prompts]
        self.pad_id = scorer.tokenizer.pad_token_id or 0
        started = time.perf_counter()
        self.category_ids = self._token_ids(category_prompts)
        self.policy_ids = self._token_ids(policy_prompts)
        self.category_feats = self._text_features(self.category_ids)
        self.policy_feats = self._text_features(self.policy_ids)
        share_image_projections(self.model.text_encoder)
        # Packed (the default): a row's prompts as one sequence; see _itm_packed. Off: a call per row.
        self.packed = packed and self.model.text_encoder.config._attn_implementation in (None, "eager")
        self.setup_s = time.perf_counter() - started

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        with self.scorer.tokenizer_lock:
            encoded = self.scorer.tokenizer(texts, truncation=True, max_length=self.scorer.max_text_tokens)
        return [list(ids) for ids in encoded["input_ids"]]

    def _text_features(self, ids: list[list[int]]) -> torch.Tensor:
        """Normalised ITC text features (fp32), as the scorer computes a text's: ``text_proj`` of the
        unimodal encoder's [CLS], in the scorer's precision."""
        dim = self.model.config.image_text_hidden_size
        if not ids:
            return torch.zeros((0, dim), dtype=torch.float32, device=self.device)
        parts = []
        with self.scorer.device_turn, torch.inference_mode(), autocast(self.scorer.precision, self.device):
            for start in range(0, len(ids), PROMPT_BATCH):
                input_ids, mask = _pad(ids[start : start + PROMPT_BATCH], self.pad_id, self.device)
                hidden = self.model.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
                parts.append(normalize(self.model.text_proj(hidden[:, 0, :]).float(), dim=-1))
        return torch.cat(parts)

    def label(self, image_embeds: torch.Tensor, declared: list[int | None]) -> list[RowLabels]:
        """``image_embeds``: the scoring pass's vision output for the rows; ``declared``: per row the
        index of its declared name, or None (none declared, or not a name)."""
        rows = len(declared)
        if not rows:
            return []
        with self.scorer.device_turn, torch.inference_mode(), autocast(self.scorer.precision, self.device):
            image_feat = normalize(self.model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
            with torch.autocast(device_type=torch.device(self.device).type, enabled=False):
                # fp32 cosines: autocast would run this product in the half type
                category_itc = (image_feat @ self.category_feats.T).cpu().numpy()
                policy_itc = (image_feat @ self.policy_feats.T).cpu().numpy()
            candidates = [self._candidates(category_itc[row], declared[row]) for row in range(rows)]
            prompts = [self._policy_prompts(policy_itc[row]) for row in range(rows)]

            def ids_of(row: int) -> list[list[int]]:
                return [self.category_ids[c] for c in candidates[row]] + [self.policy_ids[p] for p in prompts[row]]

            def itm(row: int) -> np.ndarray:
                ids = ids_of(row)
                input_ids, mask = _pad(ids, self.pad_id, self.device)
                embeds = image_embeds[row : row + 1].expand(len(ids), -1, -1)  # one image: see _OnceForAll
                atts = torch.ones(embeds.shape[:-1], dtype=torch.long, device=self.device)
                fused = self.model.text_encoder(
                    input_ids=input_ids, attention_mask=mask, encoder_hidden_states=embeds, encoder_attention_mask=atts,
                ).last_hidden_state
                return self.model.itm_head(fused[:, 0, :]).float().softmax(dim=-1)[:, 1].cpu().numpy()

            def packed(start: int) -> list[np.ndarray]:
                chosen = list(range(start, min(start + PACKED_ROWS, rows)))
                return self._itm_packed(image_embeds[chosen[0] : chosen[-1] + 1], [ids_of(r) for r in chosen])

            if self.packed:
                probabilities = [p for part in self.scorer._map_chunks(packed, range(0, rows, PACKED_ROWS)) for p in part]
            else:
                probabilities = self.scorer._map_chunks(itm, range(rows))
        return [
            self._row(category_itc[row], policy_itc[row], candidates[row], probabilities[row], declared[row], prompts[row])
            for row in range(rows)
        ]

    def _itm_packed(self, image_embeds: torch.Tensor, ids: list[list[list[int]]]) -> list[np.ndarray]:
        """ITM of every (row, prompt) pair with each row's prompts packed into one sequence.

        Cross-attention treats query tokens independently, so a row's prompts side by side in one
        sequence attend to its image exactly as they would one by one, with the image's keys and
        values projected once and never copied per prompt; self-attention is kept within each
        prompt by a block-diagonal mask (an additive 4D mask, which transformers passes through
        as it is) and positions restart at each prompt. Each prompt's [CLS] state goes to the ITM
        head. Same arithmetic per pair as separate calls but for the kernels' blocking."""
        lengths = [[len(p) for p in row] for row in ids]
        width = max(sum(row) for row in lengths)
        n = len(ids)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        allowed = torch.zeros((n, width, width), dtype=torch.bool)
        starts = []
        for r, row in enumerate(ids):
            offset, row_starts = 0, []
            for prompt in row:
                end = offset + len(prompt)
                input_ids[r, offset:end] = torch.tensor(prompt, dtype=torch.long)
                positions[r, offset:end] = torch.arange(len(prompt))
                allowed[r, offset:end, offset:end] = True
                row_starts.append(offset)
                offset = end
            allowed[r, offset:, offset:] = True  # padding attends to padding only (never read)
            starts.append(row_starts)
        dtype = self.model.text_encoder.embeddings.word_embeddings.weight.dtype
        mask = torch.zeros((n, 1, width, width), dtype=torch.float32)
        mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
        if dtype != torch.float32:
            mask = mask.to(dtype).clamp_min(torch.finfo(dtype).min)
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        fused = self.model.text_encoder(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), position_ids=positions.to(self.device),
            encoder_hidden_states=image_embeds, encoder_attention_mask=atts,
        ).last_hidden_state
        out = []
        for r, row_starts in enumerate(starts):
            heads = fused[r, torch.as_tensor(row_starts, device=fused.device)]
            out.append(self.model.itm_head(heads).float().softmax(dim=-1)[:, 1].cpu().numpy())
        return out

    def _policy_prompts(self, policy_itc: np.ndarray) -> list[int]:
        """The policy prompts a row runs ITM for: every prompt of each policy its gate lets through."""
        out = []
        for p, gate in enumerate(self.gates):
            mine = np.flatnonzero(self.policy_of == p)
            if gate is None or policy_itc[mine].max() >= gate:
                out += mine.tolist()
        return out

    def _candidates(self, itc: np.ndarray, declared: int | None) -> list[int]:
        if not self.names:
            return []
        # Stable: equal cosines keep the names' order.
        order = np.argsort(-itc, kind="stable")[: self.top_k].tolist()
        if declared is not None and declared not in order:
            order.append(declared)
        return order

    def _row(self, itc, policy_itc, candidates, itm, declared, prompts=None) -> RowLabels:
        n = len(candidates)
        prompts = list(range(len(self.policy_of))) if prompts is None else prompts
        policy_itm = np.full(len(self.policy_of), np.nan, dtype=np.float32)
        policy_itm[prompts] = itm[n:]
        labels = [
            {"name": self.names[c], "kind": "category", "itc": float(itc[c]), "itm": float(itm[i]), "_order": i}
            for i, c in enumerate(candidates)
        ]
        for p, name in enumerate(self.policy_names):
            mine = self.policy_of == p
            gated = np.isnan(policy_itm[mine]).all()
            labels.append({
                "name": name, "kind": "policy", "itc": float(policy_itc[mine].max()),
                "itm": None if gated else float(policy_itm[mine].max()), "_order": n + p,
            })
        predicted = score = rank = None
        if candidates:
            # Highest ITM; ties: higher ITC, then the short list's order (which is the names' order on ties).
            best = max(range(n), key=lambda i: (labels[i]["itm"], labels[i]["itc"], -i))
            predicted = labels[best]["name"]
        if declared is not None:
            score = float(itm[candidates.index(declared)])
            rank = 1 + int((itc > itc[declared]).sum())
        # gated-out policies (itm None) last
        labels.sort(key=lambda item: (item["itm"] is None, -(item["itm"] or 0.0), -item["itc"], item["_order"]))
        for item in labels:
            del item["_order"]
        return RowLabels(predicted, score, rank, labels)
