def test_probe(vllm_pool, tiny_llama_dir):
    w = vllm_pool.launch(str(tiny_llama_dir))
    w.wait_ready(120)
    print("LOG", w.log_path)
    w.stop(grace_s=5)
    import subprocess
    print(subprocess.run(["grep", "-a", "DEBUG", str(w.log_path)], capture_output=True, text=True).stdout[-3000:])
