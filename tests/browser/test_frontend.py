"""What a user sees of the pack in ComfyUI's frontend, in Chromium: the node library, the template
browser and every template, the text the nodes show after a run, and the error toast.

The tests share one server and one page and run in file order (each opens what it needs). Screenshots of
every template, the report on a node and the error toast are saved (see conftest.py) and their paths printed.
With LYCORIS_WRITE_THUMBNAILS=1 the template test also (re)writes the templates' thumbnails
(example_workflows/<name>.jpg, screenshots of the loaded workflow).
"""

from __future__ import annotations

import io
import json
import os
import re
import time

import pytest
from comfyui_host import REPO

TEMPLATES = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
PACK = "comfyui-lycoris"  # the pack's folder in custom_nodes (conftest.py links it so)
PACK_NODES = ("LycorisLoaderModelOnly", "LycorisLoader", "LycorisLoaderWan22Pair", "LycorisCreateHook", "LycorisInspect",
              "LycorisConvert", "LycorisMerge", "LycorisTrain", "LycorisSave", "LycorisApply", "LycorisSaveDataset", "LycorisTrainJob")
MODEL_FOLDERS = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "VAELoader": "vae"}
PLACEHOLDERS = {"CLIPLoader", "VAELoader"}  # their files here are placeholders: a run stops there
THUMBNAIL_LIMIT = 40_000  # bytes
TEXT = "$$node-text-preview"  # the widget ComfyUI's frontend shows a node's progress text in

NODE_STATE = """() => {
    const saved = app.graph.serialize().nodes;
    return app.graph.nodes.map((n, i) => ({
        id: n.id, type: n.type, title: n.title, registered: n.type in LiteGraph.registered_node_types,
        has_errors: !!n.has_errors, bounds: [...n.boundingRect], widgets_values: saved[i].widgets_values,
        properties: n.properties}))
}"""


def object_info(server) -> dict:
    return server.get("/object_info")


def template(name: str) -> dict:
    return json.loads((REPO / "example_workflows" / f"{name}.json").read_text())


def open_template_browser(ui) -> None:
    ui.command("Comfy.BrowseTemplates")
    search = ui.page.get_by_role("dialog").get_by_placeholder("Search")
    search.fill("lycoris")
    for name in TEMPLATES:
        ui.page.get_by_role("dialog").get_by_text(name, exact=True).first.wait_for()


def open_template(ui, name: str) -> list[dict]:
    """Opens `name` from the template browser, as a user does; the loaded nodes' state."""
    open_template_browser(ui)
    ui.page.get_by_role("dialog").get_by_text(name, exact=True).first.click()
    ui.page.get_by_role("dialog").wait_for(state="detached")
    count = len(template(name)["nodes"])
    ui.page.wait_for_function("(count) => app.graph.nodes.length === count", arg=count)
    ui.command("Comfy.Canvas.FitView")
    return ui.page.evaluate(NODE_STATE)


def node_id(ui, node_type: str) -> int:
    return ui.page.evaluate("(t) => app.graph.nodes.find(n => n.type === t).id", node_type)


def set_widget(ui, node: int, widget: str, value) -> None:
    ui.page.evaluate("([id, name, value]) => { app.graph.getNodeById(id).widgets.find(w => w.name === name).value = value;"
                     " app.graph.setDirtyCanvas(true, true) }", [node, widget, value])


def node_text(ui, node: int) -> str:
    return ui.page.evaluate("([id, name]) => (app.graph.getNodeById(id).widgets || []).find(w => w.name === name)?.value ?? ''",
                            [node, TEXT])


def queue(ui, selected_output: int | None = None) -> dict:
    """Queues the open workflow (only `selected_output`'s part, as "Queue Selected Output Nodes" does) the way
    the Run button does; the server's answer to POST /prompt."""
    if selected_output is not None:
        ui.page.evaluate("(id) => { app.canvas.deselectAll(); app.canvas.selectNode(app.graph.getNodeById(id)) }",
                         selected_output)
    with ui.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as answer:
        ui.command("Comfy.QueueSelectedOutputNodes" if selected_output is not None else "Comfy.QueuePrompt")
    response = answer.value
    body = response.json()
    assert response.status == 200 and not body.get("node_errors"), body
    return body


def finished(server, prompt_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = (server.get(f"/history/{prompt_id}") or {}).get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.2)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s")


def touch(server, *names: str) -> None:
    """Marks model files as changed on disk, so that the nodes reading them run again instead of coming from
    ComfyUI's cache (an earlier test may have queued the same inputs)."""
    for name in names:
        path = server.base / "models" / name
        os.utime(path, ns=(time.time_ns(), time.time_ns()))


def execution_error(entry: dict) -> dict | None:
    return next((m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"), None)


def error_toast(ui):
    """The frontend's error overlay (the toast with Dismiss / See Errors)."""
    return ui.page.locator("div", has=ui.page.get_by_role("button", name="Dismiss")).filter(
        has_text=re.compile(r"\d+ ERRORS?", re.IGNORECASE)).last


def dismiss_errors(ui) -> None:
    dismiss = ui.page.get_by_role("button", name="Dismiss")
    if dismiss.count():
        dismiss.first.click()
        dismiss.first.wait_for(state="detached")


def overlaps(nodes: list[dict]) -> list[str]:
    found = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            ax, ay, aw, ah = a["bounds"]
            bx, by, bw, bh = b["bounds"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                found.append(f"{a['title']} ({a['type']}) and {b['title']} ({b['type']})")
    return found


def text_fits(ui, text: str) -> bool:
    """Whether the node text box holding `text` shows all of it (nothing cut off or left to scroll to)."""
    box = ui.page.locator("div.overflow-y-auto", has_text=text.splitlines()[0]).last
    box.wait_for()
    return box.evaluate("(e, text) => e.scrollHeight <= e.clientHeight + 1 && e.innerText.trim() === text", text)


def write_thumbnail(ui, name: str) -> None:
    """example_workflows/<name>.jpg: the loaded workflow, cropped to its nodes, small (the template card's image)."""
    from PIL import Image

    ui.command("Workspace.ToggleFocusMode")
    ui.command("Comfy.Canvas.FitView")
    ui.page.wait_for_timeout(500)  # the canvas redraws on its next animation frame
    left, top, right, bottom = ui.page.evaluate("""() => {
        const ds = app.canvas.ds, at = app.canvas.canvas.getBoundingClientRect(), box = [1e9, 1e9, -1e9, -1e9];
        for (const n of app.graph.nodes) {
            const [x, y, w, h] = n.boundingRect;
            box[0] = Math.min(box[0], x); box[1] = Math.min(box[1], y); box[2] = Math.max(box[2], x + w); box[3] = Math.max(box[3], y + h);
        }
        return box.map((v, i) => (v + ds.offset[i % 2]) * ds.scale + (i % 2 ? at.top : at.left) + (i < 2 ? -12 : 12)) }""")
    shot = Image.open(io.BytesIO(ui.page.screenshot())).convert("RGB")
    ui.command("Workspace.ToggleFocusMode")
    graph = shot.crop((round(left), round(top), round(right), round(bottom)))
    side = max(graph.size)
    square = Image.new("RGB", (side, side), shot.getpixel((2, shot.height // 2)))
    square.paste(graph, ((side - graph.width) // 2, (side - graph.height) // 2))
    square.resize((320, 320), Image.LANCZOS).save(REPO / "example_workflows" / f"{name}.jpg", "JPEG", quality=80, optimize=True)


# ---------------------------------------------------------------------------------------------


def test_node_library_lists_every_pack_node_in_full(frontend, server):
    info = object_info(server)
    names = {node: info[node]["display_name"] for node in PACK_NODES}
    # ComfyUI's validation errors HTML-escape display names ("LoHa&amp;#x2F;LoKr"): none of those characters.
    assert not [n for n in names.values() if set(n) & set("/&<>\"'")], names
    page = frontend.page
    frontend.command("Workspace.ToggleSidebarTab.node-library")
    page.get_by_placeholder("Search...").first.fill("lycoris")
    for node, name in names.items():
        label = page.locator("[role=treeitem] span", has_text=re.compile(f"^{re.escape(name)}$")).first
        label.wait_for()
        assert label.evaluate("e => e.scrollWidth <= e.clientWidth"), f"{node}: '{name}' is cut off in the node library"
    frontend.shot("node library")
    frontend.command("Workspace.ToggleSidebarTab.node-library")


def test_template_cards_have_titles_and_thumbnails(frontend):
    assert len(TEMPLATES) == 6, TEMPLATES
    assert not [n for n in TEMPLATES if n.startswith("lycoris_") or "_" in n], "file names are the cards' titles"
    page = frontend.page
    open_template_browser(frontend)
    images = page.get_by_role("dialog").locator(f"img[src*='/workflow_templates/{PACK}/'], img[src^='blob:']")
    page.wait_for_function("""(count) => [...document.querySelectorAll('[role=dialog] img')]
        .filter(i => i.complete && i.naturalWidth > 0).length >= count""", arg=len(TEMPLATES))
    assert images.count() >= len(TEMPLATES)
    frontend.shot("template cards", page.get_by_role("dialog"))
    page.keyboard.press("Escape")
    page.get_by_role("dialog").wait_for(state="detached")
    for name in TEMPLATES:
        thumbnail = REPO / "example_workflows" / f"{name}.jpg"
        if not os.environ.get("LYCORIS_WRITE_THUMBNAILS"):
            assert thumbnail.is_file() and 0 < thumbnail.stat().st_size <= THUMBNAIL_LIMIT, thumbnail
    assert not [f for f in frontend.failed if f"/workflow_templates/{PACK}/" in f], frontend.failed


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_as_saved_and_queues(frontend, server, name):
    saved = template(name)
    info = object_info(server)
    nodes = open_template(frontend, name)
    assert not [n["type"] for n in nodes if not n["registered"] and n["type"] != "MarkdownNote"], "missing nodes"
    assert not [n["type"] for n in nodes if n["has_errors"]], "nodes marked red"
    by_id = {n["id"]: n for n in saved["nodes"]}
    changed = {n["type"]: (n["widgets_values"], by_id[n["id"]]["widgets_values"]) for n in nodes
               if n["widgets_values"] != by_id[n["id"]]["widgets_values"]}
    assert not changed, f"widget values differ from the template's (loaded, saved): {changed}"
    deprecated = [n["type"] for n in nodes if n["type"] in info and
                  (info[n["type"]].get("deprecated") or "DEPRECATED" in info[n["type"]]["display_name"])]
    assert not deprecated, deprecated
    assert not overlaps(nodes), overlaps(nodes)
    for node in saved["nodes"]:  # the loaders say where their model files come from, as ComfyUI's templates do
        folder = MODEL_FOLDERS.get(node["type"])
        if folder:
            listed = {m["name"]: m for m in node["properties"].get("models", [])}
            model = node["widgets_values"][0]
            assert model in listed, f"{node['type']} lacks properties.models for {model}"
            assert listed[model]["directory"] == folder
            assert re.fullmatch(rf"https://huggingface\.co/Comfy-Org/[\w.-]+/resolve/main/split_files/{folder}/"
                                rf"{re.escape(model)}\?download=true", listed[model]["url"]), listed[model]["url"]
    frontend.shot(f"template {name}")
    if os.environ.get("LYCORIS_WRITE_THUMBNAILS"):
        write_thumbnail(frontend, name)

    answer = queue(frontend)  # validation passes: every value fits the node it belongs to
    entry = finished(server, answer["prompt_id"])
    error = execution_error(entry)
    assert error is None or error["node_type"] in PLACEHOLDERS, error  # only the placeholder model files fail
    if any(n["type"] == "LycorisMerge" for n in nodes):  # the bake ran: the node says what it wrote, in a few lines
        bake = node_id(frontend, "LycorisMerge")
        frontend.page.wait_for_function("([id, name]) => app.graph.getNodeById(id).widgets.some(w => w.name === name && w.value)",
                                        arg=[bake, TEXT])
        summary = node_text(frontend, bake)
        assert summary.splitlines()[0] == "wrote wan2.1_t2v_14B_fp8_e4m3fn_my_wan_lokr.safetensors", summary
        assert text_fits(frontend, summary), "the summary does not fit on the node"
    after = frontend.page.evaluate(NODE_STATE)
    assert [n["widgets_values"] for n in after] == [n["widgets_values"] for n in nodes], "values changed by a run"
    dismiss_errors(frontend)


def test_fresh_train_node_keeps_its_seed(frontend):
    """The frontend gives a `seed` input a control that re-randomizes it after each run unless told otherwise:
    a Train node must not retrain on another seed when queued again."""
    control = frontend.page.evaluate("""() => {
        const node = LiteGraph.createNode('LycorisTrain'); app.graph.add(node);
        const seed = node.widgets.find(w => w.name === 'seed');
        const values = (seed.linkedWidgets || []).map(w => w.value); app.graph.remove(node); return values }""")
    assert control == ["fixed"], control


def test_inspect_shows_its_summary_and_forgets_it_on_failure(frontend, server):
    open_template(frontend, "Inspect a LyCORIS file")
    inspect = node_id(frontend, "LycorisInspect")
    touch(server, "loras/my_wan_lokr.safetensors")
    entry = finished(server, queue(frontend)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    frontend.page.wait_for_function("([id, name]) => app.graph.getNodeById(id).widgets.some(w => w.name === name && w.value)",
                                    arg=[inspect, TEXT])
    summary = node_text(frontend, inspect)
    assert summary.splitlines() == ["my_wan_lokr.safetensors", "wan, musubi keys", "24 lokr (20 full-matrix, 4 low-rank)",
                                    "no problems"]
    assert text_fits(frontend, summary), "the summary does not fit on the node"
    report = entry["outputs"][str(node_id(frontend, "PreviewAny"))]["text"][0]
    assert "modelspec.architecture = wan2.1/lora" in report  # the whole report is the output
    frontend.shot("inspect report on the node")

    set_widget(frontend, inspect, "lora_name", "broken.safetensors")
    entry = finished(server, queue(frontend)["prompt_id"])
    assert execution_error(entry)["node_type"] == "LycorisInspect"
    frontend.page.wait_for_function("([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value"
                                    ".startsWith('failed: ')", arg=[inspect, TEXT])
    text = node_text(frontend, inspect)
    assert text.startswith("failed: loras/broken.safetensors: ") and "lokr" not in text, text
    dismiss_errors(frontend)


def test_loader_shows_its_summary_and_a_wrong_file_in_one_line(frontend, server):
    open_template(frontend, "Load a LyCORIS on Wan 2.1")
    loader, report = node_id(frontend, "LycorisLoaderModelOnly"), node_id(frontend, "PreviewAny")
    touch(server, "loras/my_wan_loha.safetensors")
    entry = finished(server, queue(frontend, selected_output=report)["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    frontend.page.wait_for_function("([id, name]) => app.graph.getNodeById(id).widgets.some(w => w.name === name && w.value)",
                                    arg=[loader, TEXT])
    summary = node_text(frontend, loader)
    assert summary.splitlines() == ["my_wan_loha.safetensors", "Wan 2.1/2.2 (wan), patch, strength 1",
                                    "24 of 24 modules applied, 0 unmatched", "24 loha",
                                    "block weights second_half=0.8, 0 modules at 0"]  # the template's example
    assert text_fits(frontend, summary), "the summary does not fit on the node"
    frontend.shot("loader report on the node")

    set_widget(frontend, loader, "lora_name", "flux_kontext_lokr_r3_a2.safetensors")
    entry = finished(server, queue(frontend, selected_output=report)["prompt_id"])
    assert execution_error(entry)["exception_type"] == "lycoris.AdapterError"
    toast = error_toast(frontend)
    toast.wait_for()
    text = toast.inner_text()
    assert ("lycoris.AdapterError: loras/flux_kontext_lokr_r3_a2.safetensors is an adapter for FLUX.1 dev / Kontext "
            "(flux), but the model is Wan 2.1/2.2 (wan)") in " ".join(text.split()), text
    assert "custom_nodes" not in text and str(server.base) not in text, text
    frontend.shot("error toast", toast)
    frontend.shot("error toast on the page")
    dismiss_errors(frontend)


def test_no_console_error_from_the_pack(frontend):
    pack = [m for m in frontend.console if m.split(":")[0] in ("error", "pageerror") and re.search("lycoris", m, re.I)]
    assert not pack, pack
    failed = [f for f in frontend.failed if re.search("lycoris", f, re.I)]
    assert not failed, failed
