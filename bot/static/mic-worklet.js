// Runs on the audio thread: turns the microphone into 20 ms chunks of 16-bit PCM.
class PCMCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.round(sampleRate * 0.02);
    this.chunk = new Int16Array(this.size);
    this.filled = 0;
  }

  process(inputs) {
    const samples = inputs[0][0];
    if (!samples) return true; // no microphone connected yet
    for (const s of samples) {
      this.chunk[this.filled++] = Math.max(-1, Math.min(1, s)) * 0x7fff;
      if (this.filled === this.size) {
        // Transferred, not copied: the main thread owns this buffer now.
        this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
        this.chunk = new Int16Array(this.size);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PCMCapture);
