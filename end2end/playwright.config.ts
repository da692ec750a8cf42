// Browser tests of the studio (docs/ui.md): Debian's Chromium, driven by Playwright, against the real
// `studio` binary serving the built-in model on the CPU, with a fresh data folder each run.
import { defineConfig } from '@playwright/test';
import { execSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const root = path.resolve(__dirname, '..');
// The config is loaded again in each worker: the runner's choices travel in the environment.
process.env.STUDIO_E2E_PORT ??= execSync(
  `node -e "const s = require('net').createServer().listen(0, '127.0.0.1', () => { console.log(s.address().port); s.close(); })"`,
).toString().trim();
process.env.STUDIO_E2E_DATA ??= fs.mkdtempSync(path.join(os.tmpdir(), 'studio-e2e-'));
// A second server started with an access token, for the token page's test. It indexes no docs: on a
// 2-core machine two indexings at start slow the first tests' generations by minutes.
process.env.STUDIO_E2E_TOKEN_PORT ??= execSync(
  `node -e "const s = require('net').createServer().listen(0, '127.0.0.1', () => { console.log(s.address().port); s.close(); })"`,
).toString().trim();
process.env.STUDIO_E2E_TOKEN_DATA ??= fs.mkdtempSync(path.join(os.tmpdir(), 'studio-e2e-token-'));
const port = process.env.STUDIO_E2E_PORT;
const tokenPort = process.env.STUDIO_E2E_TOKEN_PORT;
const studio = process.env.STUDIO_BIN ?? path.join(root, 'target/debug/studio');

export default defineConfig({
  testDir: './tests',
  outputDir: './test-results',
  timeout: 180_000,
  expect: { timeout: 30_000 },
  // One server, one worker thread: tests share its queue, so they run one at a time.
  workers: 1,
  fullyParallel: false,
  reporter: [['list']],
  use: {
    baseURL: `http://127.0.0.1:${port}`,
    browserName: 'chromium',
    launchOptions: {
      executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
      args: [
        '--no-sandbox',
        '--headless',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--no-first-run',
      ],
    },
    screenshot: 'only-on-failure',
  },
  webServer: [
    {
      command: `"${studio}" serve --preset builtin-emoji --device cpu --data-dir "${process.env.STUDIO_E2E_DATA}" --port ${port}`,
      cwd: root,
      url: `http://127.0.0.1:${port}/health`,
      timeout: 180_000,
      reuseExistingServer: false,
      stdout: 'pipe',
      stderr: 'pipe',
    },
    {
      command: `"${studio}" serve --preset builtin-emoji --device cpu --chat-docs false --token e2e-s3cret --data-dir "${process.env.STUDIO_E2E_TOKEN_DATA}" --port ${tokenPort}`,
      cwd: root,
      // The health route needs the token; a page does not.
      url: `http://127.0.0.1:${tokenPort}/studio/gallery`,
      timeout: 180_000,
      reuseExistingServer: false,
      stdout: 'pipe',
      stderr: 'pipe',
    },
  ],
});
