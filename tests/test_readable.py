import nbformat
import pandas as pd

from entruth_lite.infringer import presets
from entruth_lite.teaching import notebooks, readable


def test_numbers_are_formatted_by_what_their_name_says_they_hold():
    stats = {"template": "mosaic:0", "n_images": 1005, "rate": 0.009950248756218905, "psnr_db": 6.984227011476459,
             "decoy_p": 1e-6, "median_p": 0.012345, "kid": 0.0123456, "seeds": 3, "flag": True}
    assert readable.facts(stats).splitlines() == [
        "template: mosaic:0", "n images: 1,005", "rate: 1.0%", "psnr db: 7.0 dB", "decoy p: 1.0e-06",
        "median p: 1.2e-02", "kid: 0.0123", "seeds: 3", "flag: True"]
    assert readable.number("decoy_tpr", 2 / 3) == "66.7%" and readable.number("binomial p", 4.6e-82) == "4.6e-82"
    assert readable.number("held_out_loss", float("nan")) == "-", "not measured"
    assert readable.number("learning_rate", 1e-3) == "0.001", "a learning rate is not a share"


def test_a_styled_table_formats_every_number_hides_the_index_and_says_what_it_reads():
    table = pd.DataFrame(dict(attack=["jpeg", "blur"], strength=[20.0, 1.5], decoy_tpr=[2 / 3, 0.0],
                              decoy_median_p=[0.0012, 0.31], held_out_loss=[0.32111111, float("nan")]))
    html = readable.styled(table, "robustness.csv: means over seeds").to_html()
    for shown in ("66.7%", "0.0%", "1.2e-03", "3.1e-01", "0.321", ">-<", "robustness.csv: means over seeds"):
        assert shown in html, shown
    assert "0.666" not in html and "0.00<" not in html and 'class="row_heading' not in html


def test_unreadable_outputs_finds_raw_numbers_a_student_would_meet(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x") for _ in range(5)]
    out = nbformat.v4.new_output
    nb.cells[0].outputs = [out("stream", name="stdout", text="{'rate': 0.009950248756218905}\n")]
    nb.cells[1].outputs = [out("execute_result", data={"text/plain": "TrainConfig(model='tiny', steps=750)"},
                               execution_count=1)]
    nb.cells[2].outputs = [out("display_data", data={"text/html": "<td>0.00</td>"})]
    nb.cells[3].outputs = [out("stream", name="stderr", text="UserWarning: AuditConfig(decoys=99)\n"),
                           out("display_data", data={"text/html": "<script>{'a': 0.123456789012}</script><td>1.2e-03</td>"})]
    nb.cells[4].outputs = [out("stream", name="stdout", text="rate: 1.0% · p 0.0003026\n")]
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert notebooks.unreadable_outputs(path) == [
        "cell 0: a raw dict", "cell 0: a raw float (10 or more decimals)", "cell 1: a raw dataclass",
        "cell 2: a number rounded to 0.00 in a table"], "warnings, scripts and formatted numbers are fine"


def test_a_training_config_reads_as_one_line():
    full = presets.preset("tiny-cpu", steps=750).summary()
    assert full == "full fine-tune of 'tiny'; 750 steps of 32 images (24,000 in all), learning rate 0.001 (constant), seed 0"
    lora = presets.preset("tiny-cpu-lora").summary()
    kinds = len(presets.LORA_UNET_ALL_TARGETS)
    assert lora.startswith(f"LoRA of 'tiny': rank 32, alpha 181, on {kinds} layer kinds and the text encoder;") and \
        len(lora) < 160


def test_the_labs_power_note_says_how_its_run_differs_from_the_benchmarks():
    from entruth_lite.teaching import demo

    table = pd.DataFrame(dict(test=["decoy (projection)"] * 2, n=[64, 64], rate=[0.01, 0.02], detected=[3, 3],
                              seeds=[3, 3], median_p=[1e-3, 1e-3]))
    note = demo.measured_power_note(table, 0.01, "mosaic:0", steps=750)
    assert note.startswith("1.00%: measured at this rate") and "trained 1,500 steps, this lab 750: expect fewer" in note
    assert "measured mosaic members, not 'ring:1'" in demo.measured_power_note(table, 0.01, "ring:1", steps=1500)
    from entruth_lite.owner import verify

    assert demo.measured_power_note(table, 0.02, "mosaic:3", steps=1500) == verify.measured_power(table, 0.02)


def test_benchmark_setting_names_read_as_words_with_their_design():
    assert readable.describe_setting("lora-r32-all-te-mosaic-trigger6-alpha181") == (
        "LoRA rank 32, every layer + text encoder, alpha 181", "mosaic family, 6-letter trigger")
    assert readable.describe_setting("full-mosaic-trigger6-750") == ("full UNet, 750 steps", readable.key_design())
    assert readable.describe_setting("lora-r32-wide-te") == (
        "LoRA rank 32, attention, convolutions, feed-forward + text encoder", "ring family, 3-letter trigger")
    assert readable.describe_setting("lora-diffusers-example-mosaic-trigger6")[0].startswith("diffusers' default LoRA")
    import pandas as pd

    table = readable.label_settings(pd.DataFrame({"setting": ["full-mosaic", "lora-r8-all-te-mosaic-trigger6-lr3x"],
                                                  "rate": [0.01, 0.02]}))
    assert list(table.columns) == ["fine-tune", "design", "rate"]
    assert list(table["fine-tune"]) == ["full UNet", "LoRA rank 8, every layer + text encoder, 3x the learning rate"]
    assert list(table.design) == ["mosaic family, 3-letter trigger", "mosaic family, 6-letter trigger"]
