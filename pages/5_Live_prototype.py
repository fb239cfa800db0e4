"""Live prototype: run step 2 (and optionally step 3) for any feature now, in a subprocess."""

from pathlib import Path

import streamlit as st

from engine.errors import UserError
from engine.schema import intervention_path, prototype_path, read_artifact
from explorer import data, figures, jobs, views
from explorer.widgets import (HELP, feature_text_input, fmt, metric_row, page_setup, pathway_panel,
                              show_problem)

ctx = page_setup("Live prototype", ":material/play_circle:", many_features=True)
cfg = ctx.cfg
st.title("Live prototype")
st.caption("Any feature, now, in the background (you can leave this page and come back): **Prototype** runs "
           "step 2, its activation on a prompt and the most active features of every layer up to it; **Intervention** "
           "clamps or ablates it and samples the model's decisions on the study's prompts against the unpatched model.")

limit = cfg.app.max_custom_prompt_chars
gpu = jobs.cuda_visible()


def _start(req: jobs.JobRequest | jobs.InterventionRequest, state_key: str = "live_job") -> None:
    """Run button callback: the job exists before the page redraws (so Run shows disabled)."""
    try:
        started = jobs.start_job(cfg, ctx.config_path, ctx.cache, req)
        st.session_state[state_key] = str(started.folder)
    except UserError as exc:
        st.session_state[f"{state_key}_start_error"] = str(exc)


def _progress_text(j: jobs.JobStatus) -> str:
    parts = [f"step {j.step_index + 1}/{j.n_steps}: {j.step or 'starting'}"]
    if j.stage:
        parts.append(j.stage)
    if j.done is not None and j.total:
        parts.append(f"{j.done}/{j.total}")
    if j.eta_s is not None:
        parts.append(f"about {j.eta_s:.0f}s left")
    elif j.elapsed is not None:
        parts.append(f"{j.elapsed:.0f}s")
    return " · ".join(parts)


def job_panel(folder: str) -> None:
    j = jobs.read_job(Path(folder))
    if not j.active:
        if not st.session_state.get(f"_shown_{j.job_id}"):
            st.session_state[f"_shown_{j.job_id}"] = True
            st.rerun(scope="app")  # the result lives outside this fragment
        return
    st.progress(j.fraction, text=_progress_text(j))
    c1, c2 = st.columns([4, 1])
    c1.caption(f"Job `{j.job_id}` · {j.request.get('device', '')} · started {j.elapsed or 0:.0f}s ago")
    c2.button("Cancel", key=f"cancel_{j.job_id}", on_click=jobs.cancel_job, args=(j.folder,), icon=":material/stop:",
              width="stretch")
    tail = jobs.log_tail(j.folder, 12)
    if tail:
        st.code(tail, language=None)


def shown_job(state_key: str, request, kind: str = "prototype") -> jobs.JobStatus | None:
    """The job a tab shows: its own last one when it is for the requested feature, else that
    feature's latest job of `kind`."""
    mine = st.session_state.get(state_key)
    if mine and Path(mine, jobs.JOB_FILE).is_file():
        job = jobs.read_job(Path(mine))
        if request is None or job.feature == request.feature:
            return job
    if request is None:
        return None
    history = jobs.list_jobs(ctx.cache, request.feature, kind)
    return history[0] if history else None


def job_outcome(job, noun: str) -> bool:
    """A running job's live panel (False: nothing more to show yet), or how it ended and its log."""
    if job.active:
        st.fragment(run_every=1.0)(job_panel)(str(job.folder))
        return False
    if job.state == "failed":
        st.error(f"The {noun} failed: {job.error}", icon=":material/error:")
    elif job.state == "cancelled":
        st.warning(f"The {noun} was cancelled.", icon=":material/stop_circle:")
    else:
        st.success(f"Done in {job.elapsed or 0:.1f}s.", icon=":material/task_alt:")
    with st.expander("Log"):
        st.code(jobs.log_tail(job.folder, 40) or "(empty)", language=None)
    return True




def prototype_tab(feature: str) -> None:
    with st.container(border=True):
        c2, c3 = st.columns([2.2, 1])
        prompt = c2.radio("Prompt", ["both", "safe", "risky", "custom"], horizontal=True, key="live_prompt",
                          format_func=lambda p: {"both": "safe and risky", "custom": "custom text"}.get(p, p),
                          help="The study's two fixed prompts (from the config), or your own text")
        device = c3.radio("Device", ["cuda", "cpu"] if gpu else ["cpu"], horizontal=True, key="live_device",
                          help="CUDA when a GPU is visible on this machine, else CPU")
        text = None
        if prompt == "custom":
            text = st.text_area("Prompt text", key="live_text", height=150, max_chars=limit,
                                help=f"Run as the prompt named 'custom'; at most {limit:,} characters "
                                     "(app.max_custom_prompt_chars). The feature is read at the last token.")
        can_pathway = jobs.pathways_available() and prompt != "custom"
        with_pathway = st.checkbox("Also compute its pathway (gradient attribution and replay, written into the cache)",
                                   key="live_pathway", disabled=not can_pathway,
                                   help="Runs `python -m engine pathways --features <feature>` after the prototype, on "
                                        "the configured prompts" if can_pathway else
                                        "Pathways use the configured prompts, not custom text")
        request = None
        error = None
        if feature:
            try:
                request = jobs.validate_request(cfg, jobs.JobRequest(feature.strip(), prompt, text, device,
                                                                     bool(with_pathway and can_pathway)))
            except UserError as exc:
                error = str(exc)
        running = jobs.active_job(ctx.cache, request.feature) if request else None
        if error:
            st.error(error, icon=":material/error:")
        elif running:
            st.info(f"A job for {request.feature} is running; it is shown below.", icon=":material/hourglass_top:")
        if start_error := st.session_state.pop("live_job_start_error", None):
            st.error(start_error, icon=":material/error:")
        st.button("Run", type="primary", icon=":material/play_arrow:", key="live_run", on_click=_start, args=(request,),
                  disabled=request is None or running is not None)

    # --- which job to show: this tab's last one for this feature, else the feature's latest ---------
    job = shown_job("live_job", request)
    if job is None:
        return


    st.subheader(f"Job for {job.feature}")
    if not job_outcome(job, "job"):
        return

    if job.result_path is not None:
        try:
            result = read_artifact(job.result_path, "job result")
        except UserError as exc:
            show_problem(exc)
            return
        per = views.prototype_view(result)
        items = []
        for name, rec in per.items():
            items.append((f"Activation · {name}", fmt(rec["activation"]),
                          f"{result['feature']}'s activation at the last token of the {name} prompt "
                          f"(pre-activation {fmt(rec['pre_activation'])})"))
            items.append((f"Rank · {name}", fmt(rec["rank"]) if rec["rank"] else "inactive",
                          f"Rank of the feature among all active features of layer {result.get('layer')} on the {name} prompt"))
        metric_row(items)
        st.plotly_chart(figures.prototype_figure(result), key="live_proto", config={"displaylogo": False})
        ups, stats = views.prototype_tables(result)
        c1, c2 = st.columns([1.4, 1])
        with c1:
            st.markdown("**Upstream candidates** (most active features of the layers below, per prompt)")
            vals = [c for c in ups.columns if c not in ("feature", "layer")]
            # "–": not among that prompt's most active features (the grid would print "None")
            st.dataframe(views.numbers_as_text(ups, {c: "{:.3f}" for c in vals}), hide_index=True, width="stretch",
                         height=300, column_config={c: st.column_config.TextColumn(
                             c, help=f"Activation on the {c} prompt; – = not among its most active features") for c in vals})
        with c2:
            st.markdown("**SAE fit** at the last token")
            st.dataframe(stats, hide_index=True, width="stretch", height=300, column_config={
                "L0": st.column_config.NumberColumn(help="Active features"),
                "relative error": st.column_config.NumberColumn(format="%.3f", help="‖x − x̂‖ / ‖x‖ of the reconstruction")})
        target = prototype_path(ctx.cache, job.feature)
        note = f"replaces the current `{data.relpath(ctx, target)}`" if target.is_file() else f"writes `{data.relpath(ctx, target)}`"
        if st.button("Save into the cache", key=f"save_{job.job_id}", icon=":material/save:", help=f"Saving {note}"):
            try:
                out = jobs.save_result(ctx.cache, job)
                st.success(f"Saved {data.relpath(ctx, out)}.", icon=":material/save:")
            except UserError as exc:
                st.error(str(exc), icon=":material/error:")

    if job.state == "done" and job.request.get("with_pathway"):
        st.subheader(f"Pathway of {job.feature}")
        mode = st.radio("Prompt", ["safe", "risky", "difference"], horizontal=True, key="live_pw_prompt")
        try:
            bundle = views.pathway_bundle(ctx, job.feature, mode, 0.8, 0.98, cfg.app.max_plot_edges)
        except data.CacheProblem as exc:
            show_problem(exc)
            return
        st.caption(f"Agreement r {fmt(bundle.agreement['pearson_r'])}, validated {fmt(bundle.validated_fraction, pct=True)} "
                   "· " + HELP["r"])
        pathway_panel(ctx, bundle, key=f"live_{job.feature}_{mode}", causal={}, files=set(data.pathway_features(ctx)))




def _max_seen(feature: str) -> float | None:
    """The feature's largest activation the tokens step saw (a scale for the clamp value)."""
    try:
        toks = data.tokens(ctx, feature)
    except (data.CacheProblem, UserError):  # unreadable file, or not a feature id (said by the request check)
        return None
    stats = (toks or {}).get("activation_stats") or {}
    vals = [v for v in (stats.get("max_activation_sample"), stats.get("max_activation_prompts"))
            if isinstance(v, (int, float))]
    return max(vals) if vals else None


def intervention_tab(features: str) -> None:
    st.caption("A live mini Experiment 2: the features are set at the last prompt token, at resid_post of their "
               "layer (h + (v − a)·d, the SAE's error kept), and N replies are sampled per prompt with the study's "
               "decoding, unpatched and patched from the same seeded random numbers, then parsed with the audit's "
               "decision parser. Runs as `python -m engine intervene`.")
    with st.container(border=True):
        c1, c2, c3, c4 = st.columns([1.3, 1.2, 1, 1])
        mode = c1.radio("Intervention", ["ablate", "clamp"], horizontal=True, key="int_mode",
                        format_func=lambda m: {"ablate": "ablate (set to 0)", "clamp": "clamp to a value"}[m],
                        help="Ablate sets the features' activation to 0; clamp sets it to the value given")
        first = (features or "").split(",")[0].strip()
        seen = _max_seen(first) if first else None
        value = None
        if mode == "clamp":
            default = round(2 * seen, 3) if seen else 1.0
            value = c2.number_input("Value", value=float(default), step=0.5, format="%.3f", key=f"int_value_{first}",
                                    help="The activation to set. " + (f"{first}'s largest activation seen by the "
                                                                      f"tokens step is {fmt(seen)}; the default is "
                                                                      "twice that." if seen else ""))
        else:
            c2.caption("Value: 0")
        n = c3.number_input("Decisions per prompt", min_value=1, max_value=2000, value=50, step=10, key="int_n",
                            help="Replies sampled per prompt, for each of the unpatched and patched arms")
        seed = c4.number_input("Seed", min_value=0, value=0, step=1, key="int_seed",
                               help="The same seed gives the same replies; both arms share it")
        c5, c6, c7 = st.columns([2.5, 1, 1])
        prompt = c5.radio("Prompts", ["both", "safe", "risky"], horizontal=True, key="int_prompt",
                          format_func=lambda p: {"both": "safe and risky"}.get(p, p))
        tokens = c6.number_input("Tokens per reply", min_value=1, max_value=400, value=32, step=8, key="int_tokens",
                                 help="Most tokens generated per reply (a reply also ends after three lines, all the "
                                      "parser reads); the study generated up to 100")
        device = c7.radio("Device", ["cuda", "cpu"] if gpu else ["cpu"], horizontal=True, key="int_device")
        request, error = None, None
        if features:
            try:
                request = jobs.validate_intervention(cfg, jobs.InterventionRequest(
                    features, mode, value, int(n), prompt, int(seed), device, int(tokens)))
            except UserError as exc:
                error = str(exc)
        else:
            st.caption("Enter a feature above.")
        running = jobs.active_job(ctx.cache, request.feature, "intervention") if request else None
        if error:
            st.error(error, icon=":material/error:")
        elif running:
            st.info(f"An intervention on {request.feature} is running; it is shown below.",
                    icon=":material/hourglass_top:")
        if start_error := st.session_state.pop("int_job_start_error", None):
            st.error(start_error, icon=":material/error:")
        st.button("Run intervention", type="primary", icon=":material/play_arrow:", key="int_run", on_click=_start,
                  args=(request, "int_job"), disabled=request is None or running is not None)

    job = shown_job("int_job", request, "intervention")
    if job is None:
        return
    r = job.request
    what = (f"{'clamp to ' + fmt(r.get('value')) if r.get('mode') == 'clamp' else 'ablate'} · n {r.get('n')} per prompt "
            f"· seed {r.get('seed')} · up to {r.get('max_new_tokens', 32)} tokens per reply")
    st.subheader(f"Intervention on {job.feature}")
    st.caption(what)
    if not job_outcome(job, "intervention"):
        return
    if job.result_path is None:
        return
    try:
        result = read_artifact(job.result_path, "intervention result")
    except UserError as exc:
        show_problem(exc)
        return
    acts = {}
    for p, rec in (result.get("prompts") or {}).items():
        for f, a in (rec.get("activation") or {}).items():
            acts.setdefault(f, []).append(f"{fmt(a)} ({p})")
    if acts:
        st.caption("Activation at the last prompt token before the patch: "
                   + "; ".join(f"{f}: {', '.join(v)}" for f, v in acts.items()))
    unread = [f"{p} ({'unpatched' if arm == 'baseline' else 'patched'})"
              for p, rec in (result.get("prompts") or {}).items() for arm in ("baseline", "patched")
              if not (rec.get(arm) or {}).get("valid")]
    if unread:
        st.warning("No reply the parser could read as a bet or a stop on " + ", ".join(unread) + ": those rates are "
                   "undefined (see the sampled replies below).", icon=":material/help:")
    st.plotly_chart(figures.intervention_figure(result), key=f"int_fig_{job.job_id}", config={"displaylogo": False})
    st.dataframe(views.intervention_table(result), hide_index=True, width="stretch", column_config={
        "stop rate": st.column_config.TextColumn(help="Stops among the valid decisions"),
        "stop 95% CI": st.column_config.TextColumn(help="Wilson score interval, 95%"),
        "bet rate": st.column_config.TextColumn(help="Bets among the valid decisions"),
        "bet 95% CI": st.column_config.TextColumn(help="Wilson score interval, 95%"),
        "valid": st.column_config.NumberColumn(help="Replies the parser could read as a bet or a stop"),
        "Δ stop": st.column_config.TextColumn(help="Patched minus unpatched stop rate, in percentage points"),
        "p (stop)": st.column_config.TextColumn(
            help="Fisher's exact test (chi² with Yates when every cell has ≥ 5) of the two arms' stop counts; the "
                 "arms share random numbers, which makes the test conservative"),
    })
    prompts = list((result.get("samples") or {}).keys())
    if prompts:
        with st.expander("Sampled replies"):
            pick = st.radio("Prompt", prompts, horizontal=True, key=f"int_samples_{job.job_id}")
            st.dataframe(views.intervention_samples(result, pick), hide_index=True, width="stretch", height=300)
    target = intervention_path(ctx.cache, job.job_id)
    c1, c2 = st.columns([1, 1])
    if c1.button("Save into the cache", key=f"int_save_{job.job_id}", icon=":material/save:",
                 help=f"Writes `{data.relpath(ctx, target)}`"):
        try:
            out = jobs.save_intervention(ctx.cache, job)
            st.success(f"Saved {data.relpath(ctx, out)}.", icon=":material/save:")
        except UserError as exc:
            st.error(str(exc), icon=":material/error:")
    c2.download_button("Download JSON", job.result_path.read_bytes(), file_name=f"{job.job_id}.json",
                       mime="application/json", key=f"int_dl_{job.job_id}", icon=":material/download:")


feature = feature_text_input(help="Any feature id L<layer>-<index>, not only the selected causal features; several "
                                  "for an intervention: L3-17,L3-20. Kept in the page address (?feature=...).")
tab_proto, tab_int = st.tabs(["Prototype", "Intervention"])
with tab_proto:
    prototype_tab(feature.split(",")[0].strip() if feature else feature)
with tab_int:
    intervention_tab(feature)
